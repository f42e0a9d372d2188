"""Checkpoints: official SSAMBA/SSAST/AuM layouts (built from docs/originals.md#checkpoints),
our encoder files, strict key checking, and `ssamba export`."""

from __future__ import annotations

import pytest
import torch
from _official_layouts import DIM, FRAMES, official_aum, official_ssamba, official_ssast

from ssamba.export import main as export_main
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError, load_official, official_family, to_official

DEPTH = 2


def load_encoder(path):
    return load_encoder_file(path).encoder


def _dropped(key: str) -> bool:
    return key.startswith(("module.v.head.", "module.v.head_dist."))


@pytest.mark.parametrize(
    ("family", "build"), [("ssamba", official_ssamba), ("ssast", official_ssast)]
)
def test_official_checkpoint_loads_every_tensor_and_round_trips(family, build):
    official = build()
    encoder, heads = load_official(official, family)
    cfg = encoder.cfg
    assert (cfg.family, cfg.embed_dim, cfg.depth, cfg.input_frames, encoder.grid) == (
        family,
        DIM,
        DEPTH,
        FRAMES,
        (8, 4),
    )
    assert sorted(heads) == sorted(k.removeprefix("module.") for k in official if "predlayer" in k)
    back = to_official(encoder, heads)
    kept = {k: v for k, v in official.items() if not _dropped(k)}
    assert sorted(back) == sorted(kept)
    for key, value in kept.items():
        assert torch.equal(back[key], value), key


def test_official_ssamba_geometry_and_mixer_are_read_from_the_tensors():
    encoder, _ = load_official(official_ssamba(), "ssamba")
    cfg = encoder.cfg
    assert (cfg.norm, cfg.bimamba, cfg.divide_out, cfg.bidirectional_pairs) == (
        "layer",
        "v2",
        True,
        True,
    )
    assert cfg.double_final_norm and cfg.cls_position == "front" and cfg.prefix_tokens == 1
    with torch.no_grad():
        assert encoder(torch.randn(1, FRAMES, 128)).shape == (1, DIM)


@pytest.mark.parametrize("bimamba", ["v1", "v2"])
def test_official_aum_loads_with_rmsnorm_middle_cls_and_its_classifier(bimamba):
    official = official_aum(bimamba)
    assert official_family(official) == "aum"
    encoder, heads = load_official(official, family=None)
    cfg = encoder.cfg
    assert (cfg.family, cfg.norm, cfg.cls_position, cfg.bimamba) == (
        "aum",
        "rms",
        "middle",
        bimamba,
    )
    assert cfg.input_frames == 1024 and cfg.divide_out == (bimamba == "v2")
    assert torch.equal(encoder.pos_embed, official["pos_embed.pos_embed"])
    assert sorted(heads) == ["head.bias", "head.weight"]


def test_fine_tuned_checkpoint_with_overlapping_patches_loads_given_its_stride():
    official = official_ssamba(frames=512)
    for key in ("module.mask_embed", "module.p_input_fdim", "module.p_input_tdim"):
        del official[key]  # the fine-tuning code base keeps none of these
    grid = (12, 50)  # ESC-50: 512 frames, stride 10
    official["module.v.pos_embed"] = torch.randn(1, 1 + grid[0] * grid[1], DIM)
    official |= {
        "module.mlp_head.0.weight": torch.randn(DIM),
        "module.mlp_head.0.bias": torch.randn(DIM),
    }
    with pytest.raises(CheckpointError, match="source_stride"):
        load_official(official, "ssamba")
    encoder, heads = load_official(official, "ssamba", source_stride=10, input_frames=512)
    assert encoder.grid == grid and encoder.cfg.input_frames == 512
    assert "mlp_head.0.weight" in heads


def test_missing_and_unexpected_keys_raise_naming_them():
    official = official_ssamba()
    del official["module.v.layers.1.mixer.D_b"]
    with pytest.raises(CheckpointError, match=r"missing \[layers\.1\.mixer\.D_b\]"):
        load_official(official, "ssamba")
    official = official_ssamba()
    official["module.v.layers.0.mixer.gamma"] = torch.ones(DIM)
    with pytest.raises(CheckpointError, match=r"unexpected \[layers\.0\.mixer\.gamma\]"):
        load_official(official, "ssamba")
    official = official_ssamba()
    official["module.teacher.weight"] = torch.ones(1)
    with pytest.raises(CheckpointError, match=r"module\.teacher\.weight"):
        load_official(official, "ssamba")


def test_loading_the_wrong_family_fails_clearly():
    with pytest.raises(CheckpointError, match="blocks"):
        load_official(official_ssamba(), "ssast")


def test_encoder_file_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    encoder = AudioEncoder(
        EncoderConfig.preset("aum", "tiny", embed_dim=32, depth=2, input_frames=128)
    )
    bundle = EncoderFile(encoder.eval(), None, provenance={"step": 7})
    path = bundle.save(tmp_path / "enc" / "encoder.pt")
    loaded = load_encoder(path)
    assert loaded.cfg == encoder.cfg
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(x), encoder.forward_features(x))
    assert load_encoder_file(path).provenance["step"] == 7


def test_encoder_file_errors_name_the_file(tmp_path):
    not_ours = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, not_ours)
    with pytest.raises(CheckpointError, match=r"weights\.pt: .* nor an official"):
        load_encoder(not_ours)
    with pytest.raises(FileNotFoundError, match=r"missing\.pt"):
        load_encoder(tmp_path / "missing.pt")


def _lightning_checkpoint(tmp_path, encoder: AudioEncoder, with_config: bool):
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["mlp_head.1.weight"] = torch.randn(10, encoder.embed_dim)
    ckpt = {"state_dict": state, "hyper_parameters": {}}
    if with_config:
        ckpt["encoder_config"] = encoder.cfg.to_dict()
    else:
        ckpt["hyper_parameters"]["encoder"] = {
            "family": "ssamba",
            "size": "tiny",
            "depth": 2,
            "input_frames": 128,
        }
    path = tmp_path / "last.ckpt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("with_config", [True, False])
def test_export_writes_the_encoder_of_a_lightning_checkpoint(tmp_path, with_config):
    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig.preset("ssamba", "tiny", depth=2, input_frames=128)).eval()
    ckpt = _lightning_checkpoint(tmp_path, encoder, with_config)
    assert export_main([str(ckpt), str(tmp_path / "encoder.pt")]) == 0
    exported = load_encoder(tmp_path / "encoder.pt").eval()
    x = torch.randn(1, 128, 128)
    with torch.no_grad():
        assert torch.equal(exported(x), encoder(x))
    assert list(load_encoder_file(tmp_path / "encoder.pt").head) == ["1.weight"]
    assert list(load_encoder_file(ckpt).head) == ["1.weight"]


def test_export_converts_an_official_checkpoint(tmp_path):
    official = official_ssast()
    torch.save(official, tmp_path / "ssast.pth")
    assert export_main([str(tmp_path / "ssast.pth"), str(tmp_path / "enc.pt")]) == 0
    encoder = load_encoder(tmp_path / "enc.pt")
    assert encoder.cfg.family == "ssast" and encoder.cfg.prefix_tokens == 2
    assert torch.equal(encoder.dist_token, official["module.v.dist_token"])
