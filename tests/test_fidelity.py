"""Fidelity to the originals where a recipe claims it: masks, warm-up, precision, the AuM
position resize, the SSAST optimiser switch (docs/differences.md)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.patching import resize_pos_grid
from ssamba.tasks.finetune_cli import main as finetune_main
from ssamba.tasks.pretrain_cli import main as pretrain_main
from ssamba.tasks.schedules import lr_factor, warmup_factor

REPO = Path(__file__).resolve().parents[1]
FAITHFUL_PRETRAIN = sorted((REPO / "recipes" / "pretrain").glob("*asli_*.yaml"))
FAITHFUL_FINETUNE = [
    p for p in sorted((REPO / "recipes" / "finetune").glob("*.yaml")) if "fsdd" not in p.name
]


def printed_config(main, recipe: Path, capsys: pytest.CaptureFixture[str]) -> dict:
    assert main(["--config", str(recipe), "--print_config"]) == 0
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", [p for p in FAITHFUL_PRETRAIN if "eat" not in p.name], ids=str)
def test_faithful_pretraining_recipes_mask_warm_up_and_compute_as_the_originals(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = printed_config(pretrain_main, recipe, capsys)
    objective = config["model"]["objective"]["init_args"]
    schedule = config["model"]["schedule"]
    assert (objective["masking"], schedule["warmup"], schedule["warmup_steps"]) == (
        "original",
        "staircase",
        1000,
    )
    assert schedule["kind"] == "plateau" and objective["nce_axis"] == "original"
    assert config["trainer"]["precision"] == "32-true"  # the originals never used autocast


@pytest.mark.parametrize("recipe", FAITHFUL_FINETUNE, ids=lambda p: p.stem)
def test_finetuning_recipes_train_in_fp32_as_the_originals(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert printed_config(finetune_main, recipe, capsys)["trainer"]["precision"] == "32-true"


def test_staircase_warmup_is_zero_for_50_steps_and_steps_every_50() -> None:
    factors = [warmup_factor(step, 1000, "staircase") for step in range(1100)]
    assert set(factors[:50]) == {0.0}
    assert factors[50] == factors[99] == pytest.approx(0.05)
    assert factors[999] == pytest.approx(0.95) and factors[1000] == 1.0
    # the originals: at every step s < 1000 with s % 50 == 0, lr = s / 1000 * base, kept
    for step in range(1000):
        assert factors[step] == pytest.approx((step - step % 50) / 1000)
    assert lr_factor(10, 0, schedule="constant", warmup_steps=1000, warmup="staircase") == 0.0


def test_aum_position_grid_is_resampled_with_antialiasing_as_aum_does() -> None:
    torch.manual_seed(0)
    pos = torch.randn(1, 8 * 64, 32)
    shrunk = resize_pos_grid(pos, (8, 64), (8, 32), antialias=True)
    grid = pos.reshape(1, 8, 64, 32).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(8, 32), mode="bilinear", antialias=True)
    torch.testing.assert_close(shrunk, expected.permute(0, 2, 3, 1).reshape(1, 256, 32))
    # SSAST/SSAMBA crop the same grid around the centre instead
    cropped = resize_pos_grid(pos, (8, 64), (8, 32))
    torch.testing.assert_close(cropped, pos.reshape(1, 8, 64, 32)[:, :, 16:48].reshape(1, 256, 32))


def test_resize_input_uses_each_familys_rule() -> None:
    for family, antialias in (("aum", True), ("ssamba", False)):
        encoder = AudioEncoder(
            EncoderConfig(family=family, embed_dim=32, depth=2, input_frames=1024)
        )
        prefix = encoder.cfg.prefix_tokens  # pos_embed holds the prefix first in every family
        grid_before = encoder.pos_embed[:, prefix:].detach().clone()
        encoder.resize_input(input_frames=512)
        expected = resize_pos_grid(grid_before, (8, 64), (8, 32), antialias=antialias)
        torch.testing.assert_close(encoder.pos_embed[:, prefix:].detach(), expected)
        assert encoder.grid == (8, 32)


FINETUNE = REPO / "recipes" / "finetune"


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        # s3prl's stock SID config, which SSAMBA's run_sid.sh runs; SSAMBA's lr
        ("voxceleb1_sid", {"batch_size": 8, "accumulate": 4, "max_steps": 200000, "lr": 1e-4}),
        # s3prl's stock emotion config, which SSAMBA's run_er.sh runs; SSAMBA's lr
        ("iemocap_er", {"batch_size": 4, "accumulate": 8, "max_steps": 30000, "lr": 1e-5}),
        # SSAST's SUPERB KS budget at its patch models' rate
        ("ks1", {"batch_size": 32, "accumulate": 1, "max_steps": 20000, "lr": 1e-4}),
    ],
)
def test_superb_recipes_train_with_the_budgets_of_ssambas_scripts(
    recipe: str, expected: dict, capsys: pytest.CaptureFixture[str]
) -> None:
    config = printed_config(finetune_main, FINETUNE / f"{recipe}.yaml", capsys)
    trainer = config["trainer"]
    assert {
        "batch_size": config["data"]["batch_size"],
        "accumulate": trainer["accumulate_grad_batches"],
        "max_steps": trainer["max_steps"],
        "lr": config["model"]["lr"],
    } == expected


@pytest.mark.parametrize("recipe", ["speechcommands_v1", "speechcommands_v2"])
def test_speech_commands_warm_up_in_the_originals_staircase(
    recipe: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = printed_config(finetune_main, FINETUNE / f"{recipe}.yaml", capsys)["model"]
    assert (model["warmup"], model["warmup_steps"]) == ("staircase", 1000)
