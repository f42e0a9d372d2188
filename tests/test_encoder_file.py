"""The encoder file and its one loader: every checkpoint kind in, one-line errors for the
wrong kind, and no entry point that ever runs code pickled into a checkpoint."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from _official_layouts import official_aum, official_ssamba, official_ssast

from ssamba.export import main as export_main
from ssamba.features import FbankConfig
from ssamba.label_efficiency import InputError, check_encoder
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError
from ssamba.tasks.classify import ClassifyTask

SMALL = EncoderConfig.preset("ssamba", "tiny", depth=2, embed_dim=32, input_frames=64)
FSDD_LIKE = FbankConfig(target_length=64, mean=-8.77, std=4.64)


class _Payload:
    """Unpickling this object runs `touch <marker>`: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(tmp_path: Path, suffix: str) -> tuple[Path, Path]:
    marker = tmp_path / f"pwned{suffix}"
    path = tmp_path / f"evil{suffix}"
    state = {f"encoder.{k}": v for k, v in AudioEncoder(SMALL).state_dict().items()}
    torch.save(
        {"state_dict": state, "encoder_config": SMALL.to_dict(), "x": _Payload(marker)}, path
    )
    return path, marker


@pytest.mark.parametrize("suffix", [".ckpt", ".pt"])
def test_no_entry_point_runs_code_pickled_into_a_checkpoint(
    tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, marker = _malicious(tmp_path, suffix)

    with pytest.raises(
        CheckpointError, match=r"refused: it holds pickled Python code \(posix\.system\)"
    ):
        load_encoder_file(path)
    with pytest.raises(CheckpointError, match="refused"):
        ClassifyTask(num_classes=3, init=str(path))
    with pytest.raises(InputError, match="refused"):  # label-efficiency and the demo
        check_encoder(path)
    assert export_main([str(path), str(tmp_path / "out.pt")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "refused" in err

    assert not marker.exists()


def test_our_file_carries_features_labels_head_and_provenance(tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = {"0.weight": torch.ones(32), "0.bias": torch.zeros(32), "1.weight": torch.randn(3, 32)}
    head["1.bias"] = torch.zeros(3)
    bundle = EncoderFile(
        AudioEncoder(SMALL).eval(), FSDD_LIKE, ["a", "b", "c"], head, {"kind": "test", "step": 5}
    )
    loaded = load_encoder_file(bundle.save(tmp_path / "encoder.pt"))

    assert loaded.encoder.cfg == SMALL and loaded.labels == ["a", "b", "c"]
    assert (loaded.features.mean, loaded.features.std) == (-8.77, 4.64)
    assert loaded.provenance["step"] == 5 and loaded.kind == "test"
    assert all(torch.equal(loaded.head[k], head[k]) for k in head)
    x = torch.randn(1, 64, 128)
    with torch.no_grad():
        assert torch.equal(loaded.encoder.eval()(x), bundle.encoder(x))


def test_features_must_fit_the_encoder() -> None:
    with pytest.raises(CheckpointError, match="40 bins per frame but the encoder reads 128"):
        EncoderFile(AudioEncoder(SMALL), FbankConfig(kind="mfcc", num_ceps=40))


def test_first_release_encoder_files_still_load(tmp_path: Path) -> None:
    encoder = AudioEncoder(SMALL)
    payload = {
        "format": "ssamba-encoder",
        "version": 1,
        "config": SMALL.to_dict(),
        "state_dict": encoder.state_dict(),
        "extra": {"pretrain_step": 9, "fbank": FSDD_LIKE.to_dict()},
    }
    torch.save(payload, tmp_path / "old.pt")
    loaded = load_encoder_file(tmp_path / "old.pt")
    assert loaded.provenance["step"] == 9 and loaded.features == FSDD_LIKE


@pytest.mark.parametrize(
    ("build", "family", "kind"),
    [
        (official_ssamba, "ssamba", "pretrained"),
        (official_ssast, "ssast", "pretrained"),
        (official_aum, "aum", "pretrained"),
    ],
)
def test_official_pretrained_files_load_from_disk(tmp_path: Path, build, family, kind) -> None:
    torch.save(build(), tmp_path / "official.pth")
    bundle = load_encoder_file(tmp_path / "official.pth")
    assert bundle.encoder.cfg.family == family
    assert bundle.kind == f"official {family} checkpoint ({kind})"
    if family == "aum":  # its classifier comes along as a head without a norm
        assert bundle.features is None and sorted(bundle.head) == ["1.bias", "1.weight"]
    else:  # the originals' pretraining statistics and input length
        assert bundle.features.mean == pytest.approx(-4.2677393)
        assert bundle.features.target_length == bundle.encoder.cfg.input_frames == 64


@pytest.mark.parametrize(("frames", "grid"), [(512, (12, 50)), (1024, (12, 101)), (128, (12, 12))])
def test_official_fine_tuned_files_get_their_recipes_stride_and_length(
    tmp_path: Path, frames: int, grid: tuple[int, int]
) -> None:
    official = official_ssamba(frames=512)
    for key in ("module.mask_embed", "module.p_input_fdim", "module.p_input_tdim"):
        del official[key]  # the fine-tuning code base keeps none of these
    dim = official["module.v.pos_embed"].shape[-1]
    official["module.v.pos_embed"] = torch.randn(1, 1 + grid[0] * grid[1], dim)
    official |= {
        "module.mlp_head.0.weight": torch.randn(dim),
        "module.mlp_head.0.bias": torch.randn(dim),
        "module.mlp_head.1.weight": torch.randn(50, dim),
        "module.mlp_head.1.bias": torch.randn(50),
    }
    torch.save(official, tmp_path / "finetuned.pth")

    bundle = load_encoder_file(tmp_path / "finetuned.pth")

    cfg = bundle.encoder.cfg
    assert (cfg.stride, cfg.input_frames, bundle.encoder.grid) == ((10, 10), frames, grid)
    assert bundle.kind == "official ssamba checkpoint (fine-tuned)" and bundle.features is None
    assert sorted(bundle.head) == ["0.bias", "0.weight", "1.bias", "1.weight"]
    task = ClassifyTask(num_classes=50, init=str(tmp_path / "finetuned.pth"))
    assert task.head_source == str(tmp_path / "finetuned.pth")
    assert torch.equal(task.mlp_head[1].weight, official["module.mlp_head.1.weight"])


def test_a_file_of_the_wrong_kind_says_what_it_is(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello\n")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"format": "ssamba-results", "version": 1}, tmp_path / "task.pt")
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "other.pt")
    cases = {
        "notes.txt": "is not a readable checkpoint",
        "list.pt": "holds a list, not a checkpoint",
        "task.pt": "a 'ssamba-results' file, not an encoder",
        "other.pt": "nor an official SSAMBA/SSAST/AuM checkpoint",
    }
    for name, message in cases.items():
        with pytest.raises(CheckpointError, match=message) as error:
            load_encoder_file(tmp_path / name)
        assert "\n" not in str(error.value) and name in str(error.value)
    with pytest.raises(CheckpointError, match="a folder"):
        load_encoder_file(tmp_path)


def test_export_rewrites_any_checkpoint_as_an_encoder_file(tmp_path: Path, capsys) -> None:
    torch.save(official_ssast(), tmp_path / "ssast.pth")
    assert export_main([str(tmp_path / "ssast.pth"), str(tmp_path / "a.pt")]) == 0
    assert export_main([str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]) == 0  # already one
    assert load_encoder_file(tmp_path / "b.pt").encoder.cfg.family == "ssast"
    assert export_main([str(tmp_path / "missing.pt"), str(tmp_path / "c.pt")]) == 2
    assert export_main([str(tmp_path / "a.pt"), str(tmp_path / "a.pt")]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 2 and "missing.pt: no such file" in errors[0]
