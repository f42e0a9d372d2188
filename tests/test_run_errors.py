"""What a user meets when a run is started wrongly or ends early: one line and exit code 2
before anything is written, a clear warning, or a result that says how it was chosen.

Runs use the 3-speaker FSDD subset of test_finetune and a random 2-layer, 32-wide encoder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities import rank_zero_only
from test_datamodules import crafted_json_clips, fsdd_clips, write_shard_folder
from test_finetune import (
    FSDD,
    FSDD_LOSO,
    REPO,
    SMALL,
    quick,
    results_of,
)

from ssamba.embed.cli import main as embed_main
from ssamba.export import main as export_main
from ssamba.label_efficiency import main as label_efficiency_main
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile
from ssamba.tasks.cli_common import QUIET_NOTICES, quiet_lightning
from ssamba.tasks.evaluate_cli import main as evaluate_main
from ssamba.tasks.finetune_cli import latest_results
from ssamba.tasks.finetune_cli import main as finetune_main
from ssamba.tasks.pretrain_cli import main as pretrain_main

PRETRAIN = REPO / "recipes" / "pretrain" / "fsdd_tiny_cpu.yaml"


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if ": error:" in line]


@pytest.fixture(scope="module")
def short_run(subset_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuning run stopped by max_steps before its first validation."""
    out = tmp_path_factory.mktemp("short")
    options = [*quick(subset_shards, out), "--trainer.max_steps=2"]
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    return out


def test_a_run_that_ends_before_any_validation_tests_its_last_checkpoint_and_says_so(
    short_run: Path,
) -> None:
    results = results_of(short_run)

    assert results["selection"].startswith("last step 2 (training ended before any validation")
    assert Path(results["checkpoint"]["-"]).name == "last.ckpt"
    assert 0.0 <= results["value"] <= 1.0


def test_a_missing_ckpt_path_fails_in_one_line_before_a_run_folder_exists(
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    missing = tmp_path / "nowhere.ckpt"

    code = finetune_main(
        ["--config", str(FSDD), *quick(subset_shards, out), "--ckpt_path", str(missing)]
    )

    assert code == 2
    assert error_lines(capfd.readouterr().err) == [
        f"ssamba finetune: error: --ckpt_path: {missing} does not exist"
    ]
    assert not out.exists()


def test_a_resume_with_another_encoder_width_fails_naming_the_weights_and_keeps_config_yaml(
    short_run: Path,
    subset_shards: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    version = short_run / "fsdd" / "version_0"
    saved = (version / "config.yaml").read_bytes()
    wider = json.dumps({**SMALL, "embed_dim": 64})

    code = finetune_main(
        [
            "--config",
            str(FSDD),
            *quick(subset_shards, short_run),
            f"--model.encoder={wider}",
            "--ckpt_path=last",
        ]
    )

    assert code == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "its weights do not fit this model" in line, line
    assert "encoder.cls_token (1, 1, 32) in the checkpoint, (1, 1, 64) here" in line
    assert (version / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in (short_run / "fsdd").iterdir()) == ["version_0"]


def test_a_resume_of_the_same_model_continues_in_its_version_folder(
    short_run: Path, subset_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(short_run, out)
    resume = ["--ckpt_path=last", "--trainer.max_epochs=2", "--trainer.max_steps=3"]
    options = [*quick(subset_shards, out), *resume]

    assert finetune_main(["--config", str(FSDD), *options]) == 0

    assert sorted(p.name for p in (out / "fsdd").iterdir()) == ["version_0"]
    tested = Path(results_of(out)["checkpoint"]["-"])
    assert tested.parent == out / "fsdd" / "version_0" / "checkpoints"
    assert torch.load(tested, map_location="cpu", weights_only=True)["global_step"] == 3


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_asking_for_a_gpu_without_one_fails_in_one_line_saying_what_to_pass(
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    options = [*quick(subset_shards, out), "--trainer.accelerator=gpu"]

    assert finetune_main(["--config", str(FSDD), *options]) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert line.startswith("ssamba finetune: error: trainer: ")
    assert "--trainer.accelerator cpu" in line
    assert not list(tmp_path.rglob("*.ckpt"))


def test_a_data_fold_that_does_not_exist_says_so_and_how_this_recipe_picks_folds(
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    options = [*quick(subset_shards, tmp_path / "run"), "--data.fold=99"]

    assert finetune_main(["--config", str(FSDD_LOSO), *options]) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert "fold 99 does not exist" in line
    assert "data.test_filter" in line and "--folds" in line and "george" in line


def test_evaluate_refuses_folds_in_one_line(
    short_run: Path,
    subset_shards: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ckpt = results_of(short_run)["checkpoint"]["-"]

    code = evaluate_main(
        ["--ckpt", ckpt, "--config", str(FSDD), f"--data.shards={subset_shards}", "--folds", "all"]
    )

    assert code == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert line.startswith("ssamba evaluate: error: --folds: evaluate scores one checkpoint")


def test_evaluate_at_another_input_length_warns_that_it_differs_from_training(
    short_run: Path,
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ckpt = results_of(short_run)["checkpoint"]["-"]
    options = [
        f"--data.shards={subset_shards}",
        "--data.features.target_length=128",
        "--trainer.limit_test_batches=1",
        "--trainer.enable_progress_bar=false",
        f"--out={tmp_path}",
    ]

    assert evaluate_main(["--ckpt", ckpt, "--config", str(FSDD), *options]) == 0
    err = capfd.readouterr().err
    assert (
        f"warning: --data.features.target_length 128 differs from the 64 frames {ckpt} was trained on"
        in err
    )
    # and Lightning's advertising and its "callbacks will override" notice stay quiet
    assert not any(notice in err for notice in QUIET_NOTICES)


def test_lightning_tips_are_dropped_and_its_other_notices_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    quiet_lightning()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: For seamless cloud logging, try installing [litlogger]")
        log.info("The following callbacks returned in `LightningModule.configure_callbacks` will")
        log.info("GPU available: False, used: False")

    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]


def test_pretraining_without_a_logger_keeps_its_files_out_of_the_current_directory(
    subset_shards: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    code = pretrain_main(
        [
            "--config",
            str(PRETRAIN),
            f"--data.sources=[{{shards: {subset_shards}, splits: [train]}}]",
            f"--data.val={{shards: {subset_shards}, splits: [test]}}",
            "--data.val_max_clips=8",
            "--data.num_workers=0",
            "--data.batch_size=4",
            "--model.encoder.depth=2",
            "--model.encoder.embed_dim=32",
            "--trainer.max_steps=1",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )

    assert code == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]
    assert (tmp_path / "runs" / "pretrain" / "fsdd_tiny_cpu" / "encoder.pt").is_file()


@pytest.fixture(scope="module")
def crafted_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 FSDD clips of one speaker (take 0 the test split) and, in the training shard,
    three clips whose json is refused (10,000 levels deep; labels 5 and [["0"]])."""
    clips = fsdd_clips(fsdd_dir, ["jackson"], [0, 5, 6])
    crafted = crafted_json_clips(clips[-1].audio)
    shards = {"test": [clips[:10]], "train": [clips[10:15] + crafted + clips[15:]]}
    return write_shard_folder(tmp_path_factory.mktemp("crafted") / "shards", shards)


def skipped_bad_json(log: str) -> set[str]:
    """The clips the run logged as skipped for their json."""
    return {
        line.split(".tar:")[1].split(":")[0]
        for line in log.splitlines()
        if "skipped clip (bad_metadata)" in line and ".json refused" in line
    }


def test_pretraining_skips_and_counts_clips_whose_json_is_refused(
    crafted_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    code = pretrain_main(
        [
            "--config",
            str(PRETRAIN),
            f"--data.sources=[{{shards: {crafted_shards}, splits: [train]}}]",
            f"--data.val={{shards: {crafted_shards}, splits: [train]}}",
            "--data.num_workers=0",
            "--data.batch_size=4",
            "--model.encoder.depth=2",
            "--model.encoder.embed_dim=32",
            "--trainer.max_steps=2",
            "--trainer.val_check_interval=2",
            f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}",
            "--trainer.enable_progress_bar=false",
        ]
    )

    assert code == 0
    assert skipped_bad_json(caplog.text) == {"deep", "labels5", "nested_labels"}
    assert list(tmp_path.rglob("encoder.pt"))


def test_fine_tuning_skips_and_counts_clips_whose_json_is_refused(
    crafted_shards: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert finetune_main(["--config", str(FSDD), *quick(crafted_shards, tmp_path)]) == 0

    assert skipped_bad_json(caplog.text) == {"deep", "labels5", "nested_labels"}
    assert 0.0 <= results_of(tmp_path)["value"] <= 1.0


def pretrain_options(shards: Path, out: Path, *extra: str) -> list[str]:
    """The CPU pretraining recipe on `shards`, a 2-layer 32-wide encoder, logs under `out`."""
    return [
        "--config",
        str(PRETRAIN),
        f"--data.sources=[{{shards: {shards}, splits: [train]}}]",
        f"--data.val={{shards: {shards}, splits: [test]}}",
        "--data.val_max_clips=8",
        "--data.num_workers=0",
        "--data.batch_size=4",
        "--model.encoder.depth=2",
        "--model.encoder.embed_dim=32",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        *extra,
    ]


def truncate(path: Path) -> None:
    """What a full disk during a non-atomic copy leaves: the first part of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_truncated_last_ckpt_resumes_from_the_newest_intact_checkpoint_or_stops_in_one_line(
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "runs"
    steps = ["--trainer.max_steps=2", "--trainer.val_check_interval=1"]
    with monkeypatch.context() as patch:
        # Checkpoints are staged beside their target, never in the system temp folder
        # (a copy from there is not atomic across file systems): here there is none.
        patch.setattr(tempfile, "tempdir", str(tmp_path / "no-temp-folder"))
        assert pretrain_main(pretrain_options(subset_shards, out, *steps)) == 0
    checkpoints = out / "fsdd_tiny_cpu" / "version_0" / "checkpoints"
    last = checkpoints / "last.ckpt"
    truncate(last)
    capfd.readouterr()

    resume = ["--trainer.max_steps=3", "--trainer.val_check_interval=1", "--ckpt_path=last"]
    assert pretrain_main(pretrain_options(subset_shards, out, *resume)) == 0

    err = capfd.readouterr().err
    assert f"--ckpt_path last: {last} is damaged (truncated or not a checkpoint" in err
    assert "; resuming from " in err and "best-step" in err and "Traceback" not in err
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 3
    assert sorted(p.name for p in checkpoints.parent.parent.iterdir()) == ["version_0"]

    for path in checkpoints.glob("*.ckpt"):
        truncate(path)
    assert pretrain_main(pretrain_options(subset_shards, out, *resume)) == 2
    (line,) = error_lines(capfd.readouterr().err)
    assert f"{last} is damaged" in line and "holds no intact checkpoint" in line


def test_a_resume_of_last_never_takes_another_mode_s_checkpoint(
    short_run: Path, subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(short_run, out)
    version = out / "fsdd" / "version_0"
    saved = (version / "config.yaml").read_bytes()
    linear = [*quick(subset_shards, out), "--model.mode=linear", "--ckpt_path=last"]

    assert finetune_main(["--config", str(FSDD), *linear]) == 2

    (line,) = error_lines(capfd.readouterr().err)
    assert f"--ckpt_path last: no run under {out / 'fsdd'} is this one" in line
    assert "model.mode 'finetune' there, 'linear' here" in line
    assert (version / "config.yaml").read_bytes() == saved
    assert sorted(p.name for p in (out / "fsdd").iterdir()) == ["version_0"]


def test_a_fine_tuning_run_s_results_and_logs_carry_the_same_number(
    short_run: Path, subset_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "copy"
    shutil.copytree(short_run, out)
    assert (out / "run-0" / "results.json").is_file()

    assert finetune_main(["--config", str(FSDD), *quick(subset_shards, out)]) == 0

    assert sorted(p.name for p in (out / "fsdd").iterdir()) == ["version_0", "version_1"]
    assert latest_results(out) == out / "run-1" / "results.json"
    assert Path(results_of(out)["checkpoint"]["-"]).parent.parent.name == "version_1"


class _RunsCode:
    """Unpickling this runs `touch <marker>`: what a crafted checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_ckpt_path_is_refused_in_one_line_leaving_no_folder(
    short_run: Path, subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    real = torch.load(results_of(short_run)["checkpoint"]["-"], weights_only=True)
    crafted, marker = tmp_path / "crafted.ckpt", tmp_path / "ran"
    torch.save({**real, "x": _RunsCode(marker)}, crafted)
    out = tmp_path / "run"

    code = finetune_main(
        ["--config", str(FSDD), *quick(subset_shards, out), f"--ckpt_path={crafted}"]
    )

    assert code == 2
    err = capfd.readouterr().err
    (line,) = error_lines(err)
    assert f"--ckpt_path {crafted}: refused: it holds pickled Python code (posix.system)" in line
    assert "weights_only" not in err and "Traceback" not in err
    assert not marker.exists()
    assert not list(out.rglob("version_*"))


def blocked(tmp_path: Path) -> Path:
    """A folder that cannot be made, even by root: its parent is a regular file."""
    (tmp_path / "a-file").write_text("")
    return tmp_path / "a-file" / "out"


def test_pretraining_into_a_folder_that_cannot_be_written_says_so_in_one_line(
    subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = blocked(tmp_path)

    assert pretrain_main(pretrain_options(subset_shards, out, "--trainer.max_steps=1")) == 2

    err = capfd.readouterr().err
    assert error_lines(err) == [
        f"ssamba pretrain: error: --trainer.default_root_dir {out}: cannot write there "
        "(Not a directory)"
    ]
    assert "Traceback" not in err


def test_fine_tuning_into_a_folder_that_cannot_be_written_says_so_in_one_line(
    subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    out = blocked(tmp_path)

    assert finetune_main(["--config", str(FSDD), *quick(subset_shards, out)]) == 2

    err = capfd.readouterr().err
    assert error_lines(err) == [
        f"ssamba finetune: error: --trainer.default_root_dir {out}: cannot write there "
        "(Not a directory)"
    ]
    assert "Traceback" not in err


def test_embed_export_and_label_efficiency_into_an_unwritable_folder_say_so_in_one_line(
    subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str], sample_wav: Path
) -> None:
    encoder = tmp_path / "encoder.pt"
    EncoderFile(AudioEncoder(EncoderConfig(**SMALL, input_frames=64)), None).save(encoder)
    out = blocked(tmp_path)
    reason = "cannot write there (Not a directory)"

    assert embed_main([str(sample_wav), "--ckpt", str(encoder), "--out", str(out)]) == 2
    assert export_main([str(encoder), str(out / "encoder.pt")]) == 2
    # valid shards and encoder: label-efficiency checks its output folder last
    argv = ["--shards", str(subset_shards), "--encoder", str(encoder), "--out", str(out)]
    argv += ["--labels-per-class", "1"]
    assert label_efficiency_main(argv) == 2

    lines = capfd.readouterr().err.strip().splitlines()
    assert lines == [
        f"ssamba embed: --out {out}: {reason}",
        f"ssamba export: error: OUT's folder {out}: {reason}",
        f"ssamba label-efficiency: error: --out {out}: {reason}",
    ]


def test_evaluate_on_own_data_reports_its_task_and_writes_no_recipe_run_folder(
    subset_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "mine"
    own = ["--task=mine", "--trainer.logger.init_args.name=mine", "--trainer.max_steps=2"]
    assert finetune_main(["--config", str(FSDD), *quick(subset_shards, out), *own]) == 0
    encoder = out / "mine" / "version_0" / "encoder.pt"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recipe's runs/finetune/fsdd would land here

    options = [f"--data.shards={subset_shards}", "--trainer.enable_progress_bar=false"]
    assert evaluate_main(["--config", str(FSDD), "--ckpt", str(encoder), *options]) == 0

    assert json.loads((encoder.parent / "results.json").read_text())["task"] == "mine"
    assert list(elsewhere.iterdir()) == []


def test_a_run_shorter_than_its_epoch_validates_at_its_last_step(
    subset_shards: Path, tmp_path: Path
) -> None:
    # the recipe's epoch is 100 steps: before, a 3-step run never validated
    assert pretrain_main(pretrain_options(subset_shards, tmp_path, "--trainer.max_steps=3")) == 0

    checkpoints = tmp_path / "fsdd_tiny_cpu" / "version_0" / "checkpoints"
    assert [p.name.split("-mse")[0] for p in checkpoints.glob("best-*.ckpt")] == ["best-step3"]


def test_a_recipe_whose_shards_are_not_written_yet_says_to_shard_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)  # no work/shards/fsdd here

    assert pretrain_main(["--config", str(PRETRAIN)]) == 2

    (line,) = error_lines(capfd.readouterr().err)
    assert "shard folder work/shards/fsdd does not exist: shard the audio first" in line
    assert "make shards" in line


def test_a_linear_probe_run_says_its_lines_once_and_no_eval_mode_warning(
    subset_shards: Path,
    tmp_path: Path,
    capfd: pytest.CaptureFixture[str],
    recwarn: pytest.WarningsRecorder,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    options = [*quick(subset_shards, tmp_path), "--model.mode=linear", "--trainer.max_steps=2"]
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    first = capfd.readouterr().out
    assert "clips: " in first and "trainable encoder parameters" in first

    # what the second process of a DDP run prints: nothing of its own before training
    monkeypatch.setattr(rank_zero_only, "rank", 1)
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    second = capfd.readouterr().out
    assert "clips: " not in second and "trainable encoder parameters" not in second

    assert not [w for w in recwarn if "in eval mode" in str(w.message)]


def test_a_model_seed_that_differs_from_the_data_seed_fails_in_one_line_naming_both(
    subset_shards: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # Lightning logs both as one `seed` hyperparameter and would stop with a traceback
    out = tmp_path / "run"
    options = pretrain_options(subset_shards, out, "--trainer.max_steps=1", "--model.seed=1")

    assert pretrain_main(options) == 2

    err = capfd.readouterr().err
    assert error_lines(err) == [
        "ssamba pretrain: error: model.seed=1 and data.seed=0 differ: Lightning logs both as "
        "one hyperparameter; set both (e.g. --model.seed and --data.seed to the same value)"
    ]
    assert "Traceback" not in err and not out.exists()
