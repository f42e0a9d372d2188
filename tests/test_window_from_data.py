"""`data.features.target_length: auto`: the window sized from the clips' durations.

The shard writer records duration quantiles in stats.json; `auto` takes the 90th
percentile in frames, rounded up to a multiple of 16 and capped at 1024. Clips of known
lengths are synthesised, sharded with `ssamba shard`, and the chosen window checked.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from data_prep.__main__ import shard_main
from data_prep.stats import compute_stats
from ssamba.data.labelled import LabelledDataModule
from ssamba.data.pretrain import PretrainDataModule
from ssamba.data.shard_format import STATS_NAME
from ssamba.data.transforms import linked_input_frames
from ssamba.features import FeatureConfig, auto_target_length
from ssamba.tasks.finetune_cli import ClassifyCLI

REPO = Path(__file__).resolve().parents[1]
SR = 16000
# 20 clips of 0.30, 0.35, ..., 1.25 s; two classes
SECONDS = [round(0.30 + 0.05 * i, 2) for i in range(20)]


def write_clips(src: Path, seconds: list[float]) -> None:
    for i, length in enumerate(seconds):
        t = np.arange(round(length * SR)) / SR
        tone = (0.2 * np.sin(2 * np.pi * (200 + 40 * i) * t)).astype(np.float32)
        path = src / "train" / f"class{i % 2}" / f"clip{i:02d}.wav"
        path.parent.mkdir(parents=True, exist_ok=True)
        sf.write(path, tone, SR)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("window")
    write_clips(root / "src", SECONDS)
    assert (
        shard_main(["--corpus", "folder", "--src", str(root / "src"), "--out", str(root / "out")])
        == 0
    )
    return root / "out"


def expected_frames(seconds: float) -> int:
    """Kaldi frames (25 ms every 10 ms) of a clip, rounded up to 16, at most 1024."""
    frames = 1 + (round(seconds * SR) - 400) // 160
    return min(1024, math.ceil(frames / 16) * 16)


def test_stats_json_records_the_duration_quantiles_of_the_clips(shards: Path) -> None:
    durations = json.loads((shards / STATS_NAME).read_text())["durations"]
    quantile = torch.quantile(torch.tensor(SECONDS, dtype=torch.float64), 0.9).item()
    assert durations["p90"] == pytest.approx(quantile, abs=1e-4)  # 1.155 s
    assert durations["p50"] == pytest.approx(0.775, abs=1e-4)
    assert durations["max"] == pytest.approx(1.25, abs=1e-4)
    assert durations["clips"] == 20


def test_auto_picks_the_90th_percentile_in_frames_rounded_up_to_16(
    shards: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 1.155 s = 114 frames -> 128
    data = LabelledDataModule(
        str(shards), num_workers=0, features=FeatureConfig(target_length="auto")
    )
    assert data.fbank.target_length == expected_frames(1.155) == 128
    assert "target_length: auto -> 128 frames" in capsys.readouterr().err  # said once
    # the same for pretraining (the first source's stats.json), and what the encoder stores
    pretrain = PretrainDataModule(
        [{"shards": str(shards)}], features=FeatureConfig(target_length="auto")
    )
    assert pretrain.fbank.for_inference().target_length == 128
    # the user's number wins
    fixed = LabelledDataModule(str(shards), num_workers=0, features=FeatureConfig(target_length=80))
    assert fixed.fbank.target_length == 80


def test_the_model_input_length_follows_the_resolved_window(shards: Path) -> None:
    cli = ClassifyCLI(
        [
            "--config",
            str(REPO / "recipes" / "finetune" / "fsdd.yaml"),
            f"--data.shards={shards}",
            "--data.features.target_length=auto",
        ],
        parse_only=True,
    )
    assert cli.config.model.input_frames == 128
    assert linked_input_frames(FeatureConfig(target_length=96), str(shards)) == 96


def test_fsdd_p90_of_0605_seconds_gives_64_frames_and_long_clips_stop_at_1024() -> None:
    assert auto_target_length(0.605) == 64  # 59 frames
    assert auto_target_length(10.0) == 1008  # 998 frames
    assert auto_target_length(30.0) == 1024  # capped


def test_stats_json_without_durations_says_to_rerun_the_stats_step(shards: Path, tmp_path) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for path in shards.iterdir():
        (old / path.name).write_bytes(path.read_bytes())
    stats = json.loads((old / STATS_NAME).read_text())
    del stats["durations"]
    (old / STATS_NAME).write_text(json.dumps(stats))

    with pytest.raises(ValueError, match=r"no clip durations .* re-run `make stats SHARDS=") as err:
        LabelledDataModule(str(old), num_workers=0, features=FeatureConfig(target_length="auto"))
    assert "\n" not in str(err.value)
    # the stats step (re)measures them from the shards
    compute_stats(old)
    restored = json.loads((old / STATS_NAME).read_text())["durations"]
    assert restored == json.loads((shards / STATS_NAME).read_text())["durations"]
