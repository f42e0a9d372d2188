"""`ssamba evaluate`: score a fine-tuned checkpoint on a recipe's test (or validation) data.

    ssamba evaluate --ckpt runs/finetune/fsdd/.../best-epoch7.ckpt --config recipes/finetune/fsdd.yaml
    ssamba evaluate --ckpt ... --config recipes/finetune/esc50.yaml --data.fold 3 --split val

The checkpoint (a `ssamba finetune` .ckpt) provides the encoder and the classification
head; the recipe provides the data (any `--data.*` override applies) and the trainer.
Prints a table and writes `results.json` (task, split, metric, value, all metrics,
checkpoint, config hash) to `--out` (default: next to the checkpoint).
"""

from __future__ import annotations

import sys
from argparse import ArgumentError
from pathlib import Path

from lightning.pytorch.cli import LightningArgumentParser

from ssamba.tasks.cli_common import one_line
from ssamba.tasks.finetune_cli import ClassifyCLI, config_hash, task_name, write_results

PROG = "ssamba evaluate"


class EvaluateCLI(ClassifyCLI):
    """ClassifyCLI whose model comes from `--ckpt`, without logging a new run."""

    def __init__(self, args: list[str]) -> None:
        super().__init__(args, prog=PROG, description=__doc__)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument("--ckpt", type=str, required=True, help="Fine-tuned .ckpt to score.")
        parser.add_argument(
            "--split",
            type=str,
            default="test",
            choices=["test", "val"],
            help="Which data of the recipe to score: test (default) or val.",
        )
        parser.add_argument(
            "--out",
            type=str | None,
            default=None,
            help="Folder for results.json (default: the checkpoint's folder).",
        )

    def before_instantiate_classes(self) -> None:
        super().before_instantiate_classes()
        self.config.model.init = self.config.ckpt
        self.config.trainer.logger = False


def format_table(rows: list[dict[str, str]]) -> str:
    """Aligned plain-text table of equal-keyed rows."""
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(r[c].ljust(widths[c]) for c in columns) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = EvaluateCLI(argv)
    except SystemExit as exit_:  # --help and --print_config
        return exit_.code if isinstance(exit_.code, int) else 2
    except (ArgumentError, ValueError, FileNotFoundError) as error:
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    config, model, ckpt = cli.config, cli.model, cli.config.ckpt
    if model.head_source is None:
        print(
            f"{PROG}: error: {ckpt} has no classification head for "
            f"{model.hparams.num_classes} classes: is it a `ssamba finetune` checkpoint "
            "of this task?",
            file=sys.stderr,
        )
        return 2
    split = config.split
    run = cli.trainer.test if split == "test" else cli.trainer.validate
    scores = run(model, datamodule=cli.datamodule, verbose=False)[0]
    metric = model.hparams.metric
    name = task_name(config)
    results = {
        "task": name,
        "split": split,
        "metric": metric,
        "value": float(scores[f"{split}/{metric}"]),
        "metrics": {k: float(v) for k, v in scores.items()},
        "checkpoint": str(Path(ckpt).resolve()),
        "config_hash": config_hash(cli),
    }
    path = write_results(results, Path(config.out) if config.out else Path(ckpt).parent)
    rows = [
        {"task": name, "split": split, "metric": k.split("/", 1)[1], "value": f"{v:.4f}"}
        for k, v in sorted(results["metrics"].items())
    ]
    print(format_table(rows))
    print(f"checkpoint {results['checkpoint']}\n-> {path}")
    return 0
