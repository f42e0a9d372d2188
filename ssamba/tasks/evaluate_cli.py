"""`ssamba evaluate`: score a fine-tuned checkpoint on a recipe's test (or validation) data.

    ssamba evaluate --ckpt runs/finetune/fsdd/version_0/checkpoints/best-epoch7.ckpt \\
        --config recipes/finetune/fsdd.yaml
    ssamba evaluate --ckpt ... --config recipes/finetune/esc50.yaml --data.fold 3 --split val
    ssamba evaluate --ckpt ... --config ... --trainer.strategy ddp --trainer.devices 2

The checkpoint (a `ssamba finetune` .ckpt, or the encoder.pt written beside it) provides
the encoder and the classification head; the recipe provides the data (any `--data.*`
override applies) and the trainer. Every clip is scored once over all processes. Prints
a table and writes `results.json` (task, split, metric, value, all metrics, checkpoint,
config hash) to `--out` (default: next to the checkpoint).

Which options apply: `--ckpt`, `--split`, `--out`, `--task`, `--data.*` (the data to
score: shards, fold, target_length, batch_size, ...) and the trainer's device options
(`--trainer.accelerator`, `devices`, `strategy`, `num_nodes`, `precision`,
`limit_test_batches`). The `--model.*` settings come from the checkpoint, and the
Trainer's training options (max_epochs, callbacks, logger, ...) are read with the recipe
but unused. A `--data.features.target_length` other than the checkpoint's input length is scored
(the position embedding is resized) with a warning: the numbers are then not those of
the trained model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser

from ssamba.tasks.cli_common import (
    SETUP_ERRORS,
    RunResult,
    SetupError,
    exit_code,
    peek_checkpoint,
    setup_error_line,
)
from ssamba.tasks.finetune_cli import ClassifyCLI, config_hash, task_name, write_results

PROG = "ssamba evaluate"
# Options of `ssamba finetune` that evaluating a checkpoint does not use: left out of
# `--help` (`--folds` is still read, to refuse it with a line that says what to do).
TRAINING_ONLY = ("ckpt_path", "folds", "cross_validation", "defaults")


class EvaluateCLI(ClassifyCLI):
    """ClassifyCLI whose model comes from `--ckpt`, without logging a new run."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(args, prog=PROG, description=__doc__)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        for action in parser._actions:
            if action.dest in TRAINING_ONLY:
                action.help = argparse.SUPPRESS
        parser.add_argument(
            "--ckpt",
            type=str,
            required=True,
            help="Fine-tuned .ckpt (or its encoder.pt) to score.",
        )
        parser.add_argument(
            "--split",
            type=Literal["test", "val"],
            default="test",
            help="Which data of the recipe to score: test (default) or val.",
        )
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="Folder for results.json (default: the checkpoint's folder).",
        )

    def before_instantiate_classes(self) -> None:
        if self.config.get("folds"):
            raise ValueError(
                "--folds: evaluate scores one checkpoint on one split; pick the fold's data "
                f"with its config key ({(self.config.cross_validation or {}).get('key', 'data.*')})"
                " and run evaluate once per fold's checkpoint"
            )
        super().before_instantiate_classes()
        trained = trained_input_frames(self.config.ckpt)
        asked = self.config.model.get("input_frames")  # data.features.target_length, resolved
        if trained is not None and asked is not None and asked != trained:
            print(
                f"{PROG}: warning: --data.features.target_length {asked} differs from the "
                f"{trained} frames {self.config.ckpt} was trained on; its position embedding "
                f"is resized, so the scores are not those of the trained model (pass "
                f"--data.features.target_length {trained} to score it as trained)",
                file=sys.stderr,
            )
        self.config.model.init = self.config.ckpt
        self.config.model.encoder = None  # the checkpoint says
        self.config.trainer.logger = False


def trained_input_frames(ckpt: str) -> int | None:
    """Input length (frames) of the encoder stored in a `.ckpt` or encoder file; None when
    the file says nothing (or cannot be read here: the model's loader reports that)."""
    payload = peek_checkpoint(ckpt) or {}
    config = payload.get("encoder_config") or payload.get("config")
    frames = config.get("input_frames") if isinstance(config, dict) else None
    return int(frames) if isinstance(frames, int) else None


def evaluated_task(config: Namespace) -> str:
    """`--task`; else the task of the fine-tuning run that wrote `--ckpt` (its
    config.yaml beside the checkpoint: `task`, else the logger's name), so a checkpoint of
    your own data is not reported under the recipe's name; else the recipe's name."""
    if config.get("task"):
        return str(config.task)
    ckpt = Path(config.ckpt)
    for folder in (ckpt.parent, ckpt.parent.parent):  # encoder.pt, checkpoints/x.ckpt
        saved = folder / "config.yaml"
        if saved.is_file():
            try:
                run = yaml.safe_load(saved.read_text())
            except (OSError, yaml.YAMLError):
                break
            name = (run.get("task") or _logger_name(run)) if isinstance(run, dict) else None
            if name:
                return str(name).split("/")[0]  # a fold's logs: <name>/fold-<fold>
            break
    return task_name(config)


def _logger_name(run: dict[str, Any]) -> str | None:
    logger = (run.get("trainer") or {}).get("logger")
    init = logger.get("init_args") if isinstance(logger, dict) else None
    return init.get("name") if isinstance(init, dict) else None


def format_table(rows: list[dict[str, str]]) -> str:
    """Aligned plain-text table of equal-keyed rows."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def evaluate(argv: list[str] | None = None) -> RunResult:
    """Score a checkpoint on a recipe's data (command-line arguments); returns the task, its
    metrics, `files["results"]` and the results.json record. A bad recipe or a checkpoint
    without a head for the task raises `SetupError` before scoring."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = EvaluateCLI(argv)
    except SETUP_ERRORS as error:
        raise SetupError(setup_error_line(error)) from error
    config, model, ckpt = cli.config, cli.model, cli.config.ckpt
    if model.head_source is None:
        raise SetupError(
            f"{ckpt} has no classification head for {model.hparams.num_classes} classes: "
            "is it a `ssamba finetune` checkpoint of this task?"
        )
    split = config.split
    run = cli.trainer.test if split == "test" else cli.trainer.validate
    scores = run(model, datamodule=cli.datamodule, verbose=False)[0]
    metric = model.hparams.metric
    results = {
        "task": evaluated_task(config),
        "split": split,
        "metric": metric,
        "value": float(scores[f"{split}/{metric}"]),
        "metrics": {k: float(v) for k, v in scores.items()},
        "checkpoint": str(Path(ckpt).resolve()),
        "config_hash": config_hash(cli),
    }
    if not cli.trainer.is_global_zero:  # every process scored its share; one writes
        return RunResult(model, results["metrics"], {}, results)
    path = write_results(results, Path(config.out) if config.out else Path(ckpt).parent)
    return RunResult(model, results["metrics"], {"results": str(path.resolve())}, results)


def main(argv: list[str] | None = None) -> int:
    """`ssamba evaluate`: prints the metrics; exit code 2 with one line for bad input."""

    def run() -> None:
        result = evaluate(argv)
        if "results" not in result.files:
            return
        record = result.record or {}
        rows = [
            {
                "task": record["task"],
                "split": record["split"],
                "metric": k.split("/", 1)[1],
                "value": f"{v:.4f}",
            }
            for k, v in sorted(record["metrics"].items())
        ]
        print(format_table(rows))
        print(f"checkpoint {record['checkpoint']}\n-> {result.files['results']}")

    return exit_code(run, PROG)
