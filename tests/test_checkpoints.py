"""Checkpoints: official SSAMBA/SSAST/AuM layouts (built from REFERENCE.md B), our encoder
files, strict key checking, and `ssamba export`."""

from __future__ import annotations

import math

import pytest
import torch

from ssamba.models.checkpoints import (
    CheckpointError,
    encoder_from_lightning,
    export_main,
    load_encoder,
    load_official,
    official_family,
    save_encoder,
    to_official,
)
from ssamba.models.encoder import AudioEncoder, EncoderConfig

DIM, DEPTH, FRAMES = 64, 2, 64  # 16x16 patches at 64 frames: grid 8 x 4 = 32 patches


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _ssl_extras(dim: int, frames: int) -> dict[str, torch.Tensor]:
    """What both SSL code bases add next to `v`: geometry, mask embedding, MSPM heads."""
    out = {
        "module.p_input_fdim": torch.tensor(128),
        "module.p_input_tdim": torch.tensor(frames),
        "module.mask_embed": _random(1, 1, dim),
    }
    for head in ("cpredlayer", "gpredlayer"):
        out |= {
            f"module.{head}.0.weight": _random(dim, dim),
            f"module.{head}.0.bias": _random(dim),
            f"module.{head}.2.weight": _random(256, dim),
            f"module.{head}.2.bias": _random(256),
        }
    return out


def _mamba_layers(prefix: str, dim: int, bimamba: str, norm_bias: bool) -> dict[str, torch.Tensor]:
    rank, inner = math.ceil(dim / 16), 2 * dim
    out = {}
    for i in range(DEPTH):
        p = f"{prefix}layers.{i}."
        out[p + "norm.weight"] = _random(dim)
        if norm_bias:
            out[p + "norm.bias"] = _random(dim)
        directions = {"v2": ["", "_b"], "v1": [""], "none": [""]}[bimamba]
        for s in directions:
            out |= {
                f"{p}mixer.conv1d{s}.weight": _random(inner, 1, 4),
                f"{p}mixer.conv1d{s}.bias": _random(inner),
                f"{p}mixer.x_proj{s}.weight": _random(rank + 32, inner),
                f"{p}mixer.dt_proj{s}.weight": _random(inner, rank),
                f"{p}mixer.dt_proj{s}.bias": _random(inner),
                f"{p}mixer.D{s}": _random(inner),
            }
        out[p + "mixer.A_log"] = _random(inner, 16)
        if bimamba != "none":
            out[p + "mixer.A_b_log"] = _random(inner, 16)
        out[p + "mixer.in_proj.weight"] = _random(4 * dim, dim)
        out[p + "mixer.out_proj.weight"] = _random(dim, inner)
    return out


def official_ssamba(dim: int = DIM, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """A pretrained SSAMBA `.pth` with the official key names and shapes, random values."""
    patches = 8 * (frames // 16)
    sd = {
        "module.v.cls_token": _random(1, 1, dim),
        "module.v.pos_embed": _random(1, 1 + patches, dim),
        "module.v.patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "module.v.patch_embed.proj.bias": _random(dim),
        "module.v.head.weight": _random(1000, dim),
        "module.v.head.bias": _random(1000),
        "module.v.norm_f.weight": _random(dim),
        "module.v.norm_f.bias": _random(dim),
    }
    return sd | _mamba_layers("module.v.", dim, "v2", norm_bias=True) | _ssl_extras(dim, frames)


def official_ssast(dim: int = DIM, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """A pretrained SSAST `.pth` (timm DeiT under `module.v.`), random values."""
    patches = 8 * (frames // 16)
    sd = {
        "module.v.cls_token": _random(1, 1, dim),
        "module.v.dist_token": _random(1, 1, dim),
        "module.v.pos_embed": _random(1, 2 + patches, dim),
        "module.v.patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "module.v.patch_embed.proj.bias": _random(dim),
        "module.v.norm.weight": _random(dim),
        "module.v.norm.bias": _random(dim),
        "module.v.head.weight": _random(1000, dim),
        "module.v.head.bias": _random(1000),
        "module.v.head_dist.weight": _random(1000, dim),
        "module.v.head_dist.bias": _random(1000),
    }
    for i in range(DEPTH):
        p = f"module.v.blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd |= {f"{p}{norm}.weight": _random(dim), f"{p}{norm}.bias": _random(dim)}
        for name, (out, inp) in {
            "attn.qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "mlp.fc1": (4 * dim, dim),
            "mlp.fc2": (dim, 4 * dim),
        }.items():
            sd |= {f"{p}{name}.weight": _random(out, inp), f"{p}{name}.bias": _random(out)}
    return sd | _ssl_extras(dim, frames)


def official_aum(bimamba: str = "v2", dim: int = DIM) -> dict[str, torch.Tensor]:
    """An AuM classifier (RMSNorm, `pos_embed.pos_embed`, no `module.`), 1024 frames."""
    sd = {
        "cls_token": _random(1, 1, dim),
        "pos_embed.pos_embed": _random(1, 1 + 512, dim),
        "patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "patch_embed.proj.bias": _random(dim),
        "norm_f.weight": _random(dim),
        "head.weight": _random(527, dim),
        "head.bias": _random(527),
    }
    return sd | _mamba_layers("", dim, bimamba, norm_bias=False)


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
    path = save_encoder(encoder.eval(), tmp_path / "enc" / "encoder.pt", extra={"step": 7})
    loaded = load_encoder(path)
    assert loaded.cfg == encoder.cfg
    x = torch.randn(2, 128, 128)
    with torch.no_grad():
        assert torch.equal(loaded.eval().forward_features(x), encoder.forward_features(x))
    assert torch.load(path, weights_only=True)["extra"] == {"step": 7}


def test_encoder_file_errors_name_the_file(tmp_path):
    not_ours = tmp_path / "weights.pt"
    torch.save({"a": torch.zeros(1)}, not_ours)
    with pytest.raises(CheckpointError, match=r"weights\.pt: not an ssamba encoder file"):
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
    extra = torch.load(tmp_path / "encoder.pt", weights_only=True)["extra"]
    assert list(extra["heads"]) == ["mlp_head.1.weight"]
    _, heads = encoder_from_lightning(ckpt)
    assert list(heads) == ["mlp_head.1.weight"]


def test_export_converts_an_official_checkpoint(tmp_path):
    official = official_ssast()
    torch.save(official, tmp_path / "ssast.pth")
    assert (
        export_main([str(tmp_path / "ssast.pth"), str(tmp_path / "enc.pt"), "--official", "auto"])
        == 0
    )
    encoder = load_encoder(tmp_path / "enc.pt")
    assert encoder.cfg.family == "ssast" and encoder.cfg.prefix_tokens == 2
    assert torch.equal(encoder.dist_token, official["module.v.dist_token"])
