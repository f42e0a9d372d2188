"""`ssamba finetune` and `ssamba evaluate` on two CPU processes (Lightning DDP, gloo), as a
user runs them: the unmodified FSDD recipe, an encoder file as init, one epoch.

Every clip is evaluated once over all ranks and the metrics are gathered, so the test
result of two processes equals a one-process evaluation of the same checkpoint; only
rank 0 writes results, the index line and the encoder file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_finetune import FSDD, REPO, SMALL, fsdd_subset, results_of, run_options, save_encoder
from test_pretrain import failure_report

from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.tasks.cli_common import QUIET_NOTICES
from ssamba.tasks.evaluate_cli import main as evaluate_main

WORLD = 2
# 3 speakers x takes 0-9: 150 test clips, 150 training clips of which 20% validate, so
# that each of the two ranks gets at least one batch of 8 validation clips.
DATA = ["--data.batch_size=8", "--data.val_fraction=0.2"]
DDP = ["--trainer.strategy=ddp", f"--trainer.devices={WORLD}", "--trainer.accelerator=cpu"]


def ssamba(*args: str) -> subprocess.CompletedProcess:
    """`python -m ssamba ...` in its own process (Lightning DDP starts the other rank by
    running the same command line again)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "ssamba", *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


@pytest.fixture(scope="module")
def shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fsdd_subset(fsdd_dir, tmp_path_factory.mktemp("fsdd_takes_0_9"), takes=10)


@pytest.fixture(scope="module")
def ddp_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One epoch of fine-tuning on two processes; (its task folder, stderr)."""
    root = tmp_path_factory.mktemp("ddp")
    encoder = save_encoder(AudioEncoder(EncoderConfig(**SMALL, input_frames=64)), root / "init.pt")
    out = root / "finetune"
    options = [*run_options(shards, out), f"--model.init={encoder}", *DATA, *DDP]
    result = ssamba("finetune", "--config", str(FSDD), "--trainer.max_epochs=1", *options)
    assert result.returncode == 0, failure_report(result.stderr)
    return out, result.stderr


@pytest.mark.slow
def test_finetuning_on_two_processes_writes_one_result_and_one_encoder_file(
    ddp_run: tuple[Path, str],
) -> None:
    out, err = ddp_run

    assert "distributed_backend=gloo" in err and "Starting with 2 processes" in err
    assert not any(notice in err for notice in QUIET_NOTICES)
    assert [p.name for p in out.glob("run-*")] == ["run-0"]
    assert len((out / "index.jsonl").read_text().splitlines()) == 1
    results = results_of(out)
    clips = results["clips"]["-"]
    assert clips["test"] == 150 and clips["train"] + clips["val"] == 150
    assert "best val/acc epoch" in results["selection"]
    encoder = Path(results["encoder_file"]["-"])
    assert encoder.is_file() and encoder.parent == Path(results["checkpoint"]["-"]).parent.parent


@pytest.mark.slow
def test_test_scores_of_two_processes_equal_those_of_one(
    ddp_run: tuple[Path, str], shards: Path, tmp_path: Path
) -> None:
    trained = results_of(ddp_run[0])
    ckpt = trained["checkpoint"]["-"]
    common = ["--ckpt", ckpt, "--config", str(FSDD), f"--data.shards={shards}", *DATA[:1]]
    common.append("--trainer.enable_progress_bar=false")

    assert evaluate_main([*common, f"--out={tmp_path / 'one'}"]) == 0
    two = ssamba("evaluate", *common, *DDP, f"--out={tmp_path / 'two'}")
    assert two.returncode == 0, failure_report(two.stderr)

    one_scores = json.loads((tmp_path / "one" / "results.json").read_text())["metrics"]
    two_scores = json.loads((tmp_path / "two" / "results.json").read_text())["metrics"]
    for metric in ("test/acc", "test/mAP"):  # torchmetrics states gathered over ranks
        assert two_scores[metric] == pytest.approx(one_scores[metric], abs=1e-6)
        assert trained["metrics"]["-"][metric] == pytest.approx(one_scores[metric], abs=1e-6)
    assert two.stdout.count("checkpoint ") == 1  # one table, from rank 0


def test_a_subset_too_small_for_every_process_fails_in_one_line_before_ddp_starts(
    shards: Path, tmp_path: Path
) -> None:
    # ~30 validation clips make one batch of 32: the second process would have none
    options = [*run_options(shards, tmp_path / "run"), "--model.init=random", *DDP]
    encoder = f"--model.encoder={json.dumps(SMALL)}"
    too_big = ["--data.batch_size=32", "--data.val_fraction=0.2"]

    result = ssamba("finetune", "--config", str(FSDD), encoder, *options, *too_big)

    assert result.returncode == 2, failure_report(result.stderr)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1
    assert re.fullmatch(
        rf"ssamba finetune: error: {shards}: the val set has \d\d clips, too few for one batch "
        r"of 32 on each of 2 processes \(lower --data.batch_size or --trainer.devices\)",
        errors[0],
    )
    assert "Starting with 2 processes" not in result.stderr
    assert not list(tmp_path.rglob("*.ckpt"))
