"""`ssamba finetune`: fine-tune or linearly probe an encoder on a labelled task.

    ssamba finetune --config recipes/finetune/esc50.yaml --model.init runs/pretrain/encoder.pt
    ssamba finetune --config recipes/finetune/esc50.yaml --model.init ... --folds all
    ssamba finetune --config recipes/finetune/fsdd_loso.yaml --folds george,theo
    ssamba finetune --config recipes/finetune/fsdd.yaml --model.mode linear --print_config

A recipe is a LightningCLI YAML (`model:` = ClassifyTask, `data:` = LabelledDataModule,
`trainer:`), plus `cross_validation:` for k-fold tasks: which config key selects the test
fold and the folds that exist. `--folds all` (or a comma list) runs one fit per fold,
logged under `<logger name>/fold-<name>/`. Every fold's settings and data split are
checked before the first one trains; a bad recipe, override, checkpoint or label stops
the run with one `ssamba finetune: error:` line and exit code 2.

Each fold keeps the epoch that is best on its *validation* data, then tests that
checkpoint once (the AudioSet-20K recipe tests its epoch-averaged weights instead).
The originals picked ESC-50's epoch on the fold-averaged *test* accuracy, which
overstates the result; we do not. `<trainer.default_root_dir>/results.json` then holds
the task, metric, per-fold test values, mean, std (ddof=1), how the checkpoint was
selected, the checkpoints tested, the clips per subset and the config hash.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
from argparse import ArgumentError
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from ssamba.data.labelled import LabelledDataModule
from ssamba.tasks.classify import ClassifyTask, EpochWeightAveraging
from ssamba.tasks.cli_common import SsambaCLI, one_line

PROG = "ssamba finetune"
FOLDS_ALL = "all"
RESULTS_NAME = "results.json"


class ClassifyCLI(SsambaCLI):
    """The shared CLI over ClassifyTask + LabelledDataModule (finetune and evaluate).

    The model's class count and input length follow the data section, so a recipe states
    each once. `parse_only=True` stops after parsing: the fold loop reads the recipe
    without building a model it would throw away.
    """

    def __init__(
        self,
        args: list[str],
        parse_only: bool = False,
        prog: str = PROG,
        description: str = __doc__,
    ) -> None:
        self.parse_only = parse_only
        super().__init__(
            ClassifyTask,
            LabelledDataModule,
            args,
            prog=prog,
            description=description,
            links=[("data.target_length", "model.input_frames")],
            exit_on_error=False,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_argument(
            "--task",
            type=str | None,
            default=None,
            help="Task name written to results.json (default: the recipe file's name).",
        )
        parser.add_argument(
            "--cross_validation",
            type=dict | None,
            default=None,
            help="k-fold tasks: {key: <config key of the test fold>, folds: [names] or "
            "{name: value}}; `--folds all|a,b` runs them.",
        )
        parser.add_argument(
            "--folds",
            type=str | None,
            default=None,
            help="Run the recipe's cross-validation folds: `all` or a comma list of fold "
            "names; each fold's test result goes to results.json with mean +/- std.",
        )
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")

    def before_instantiate_classes(self) -> None:
        if not self.parse_only:
            super().before_instantiate_classes()

    def instantiate_classes(self) -> None:
        if not self.parse_only:
            super().instantiate_classes()


def task_name(config: Namespace) -> str:
    """`--task`, else the stem of the last `--config` file, else "task"."""
    if config.get("task"):
        return config["task"]
    configs = config.get("config") or []
    return Path(str(configs[-1])).stem if configs else "task"


def config_hash(cli: LightningCLI) -> str:
    """12 hex digits of sha256 over the merged config: equal runs, equal hash."""
    dumped = cli.parser.dump(cli.config, skip_none=False, skip_validation=True)
    return hashlib.sha256(dumped.encode()).hexdigest()[:12]


def write_results(results: dict[str, Any], directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / RESULTS_NAME
    path.write_text(json.dumps(results, indent=2) + "\n")
    return path


class RecipeError(ValueError):
    """A recipe, override or data problem found before training; one line says which."""


def select_folds(requested: str, cross_validation: dict[str, Any] | None) -> dict[str, Any]:
    """fold name -> value of the fold key, for `all` or a comma list of names."""
    if not cross_validation:
        raise RecipeError(
            "--folds: this recipe has no cross_validation section (no folds to run); "
            "drop --folds for a single train/valid/test run"
        )
    folds = cross_validation["folds"]
    known = {str(v): v for v in folds} if isinstance(folds, list) else dict(folds)
    if requested == FOLDS_ALL:
        return known
    names = [name.strip() for name in requested.split(",") if name.strip()]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise RecipeError(
            f"--folds: {unknown or requested!r} not among the recipe's folds {list(known)}"
        )
    return {name: known[name] for name in names}


def build(argv: list[str]) -> tuple[ClassifyCLI, dict[str, int]]:
    """Model, data and trainer of one run, with the data split checked before any step.

    Construction errors (a checkpoint of the wrong family or size, a missing file) and
    data errors (a label outside labels.csv, an unknown fold, an empty or
    test-overlapping subset) become a `RecipeError` naming the key, file or clip.
    Returns the CLI and the clips per subset.
    """
    try:
        cli = ClassifyCLI(argv)
        counts = cli.datamodule.split_clips()  # every subset the run will read
    except (ArgumentError, ValueError, FileNotFoundError) as error:
        raise RecipeError(one_line(str(error))) from error
    print("clips: " + ", ".join(f"{name} {n}" for name, n in counts.items()), flush=True)
    return cli, counts


def run_one(argv: list[str]) -> dict[str, Any]:
    """Fit one configuration, then test its selected checkpoint; returns the record."""
    cli, counts = build(argv)
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    trainer.fit(model, datamodule=data)
    averaging = [cb for cb in trainer.callbacks if isinstance(cb, EpochWeightAveraging)]
    validation = data.predicates["val"]
    if averaging:
        window = f"{averaging[0].first_epoch}-{averaging[0].last_epoch}"
        ckpt, selection = averaging[0].averaged_path, f"average of epochs {window}"
    elif validation is None:
        ckpt, selection = trainer.checkpoint_callback.last_model_path, "last epoch (no val set)"
    else:
        ckpt = trainer.checkpoint_callback.best_model_path
        where = "the test set (as SSAST)" if validation == data.predicates["test"] else validation
        selection = f"best val/{model.hparams.metric} epoch, val = {where}"
    if not ckpt:
        raise RuntimeError("no checkpoint was saved: did validation run (check trainer limits)?")
    metric = f"test/{model.hparams.metric}"
    scores = trainer.test(model, datamodule=data, ckpt_path=ckpt, verbose=False)[0]
    return {
        "value": float(scores[metric]),
        "metrics": {k: float(v) for k, v in scores.items()},
        "checkpoint": str(Path(ckpt).resolve()),
        "selection": selection,
        "clips": counts,
    }


def main(argv: list[str] | None = None) -> int:
    """Run a recipe (each requested fold); exit code 2 with one line for a bad recipe."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        base = ClassifyCLI(argv, parse_only=True)
        return _run(base, argv)
    except SystemExit as exit_:  # --help and --print_config
        return exit_.code if isinstance(exit_.code, int) else 2
    except (ArgumentError, RecipeError) as error:
        print(f"{PROG}: error: {one_line(str(error))}", file=sys.stderr)
        return 2


def fold_runs(config: Namespace, argv: list[str], root: Path) -> dict[str, list[str]]:
    """fold name -> argv of its run; `{"-": argv}` when `--folds` is not given."""
    folds_arg = config["folds"]
    if folds_arg is None:
        return {"-": argv}
    cross_validation = config["cross_validation"]
    selected = select_folds(folds_arg, cross_validation)
    key = cross_validation["key"]
    return {
        fold: [
            *argv,
            f"--{key}={value if isinstance(value, str) else json.dumps(value)}",
            f"--trainer.default_root_dir={root / f'fold-{fold}'}",
            *fold_logger_args(config, fold),
        ]
        for fold, value in selected.items()
    }


def fold_logger_args(config: Namespace, fold: str) -> list[str]:
    """Log each fold under `<logger name>/fold-<fold>/version_*`, not as anonymous versions."""
    logger = config["trainer"].get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is None:
        return []
    return [f"--trainer.logger.init_args.name={init.get('name') or 'lightning_logs'}/fold-{fold}"]


def _run(base: ClassifyCLI, argv: list[str]) -> int:
    config = base.config
    root = Path(config["trainer"]["default_root_dir"] or ".")
    name = task_name(config)
    folds_arg = config["folds"]
    runs = fold_runs(config, argv, root)
    if len(runs) > 1:  # a fold whose data or settings are wrong fails before fold 1 trains
        for fold_argv in runs.values():
            build(fold_argv)
    records = {}
    for fold, fold_argv in runs.items():
        if fold != "-":
            print(f"== {name}: fold {fold} ({len(records) + 1}/{len(runs)})")
        records[fold] = run_one(fold_argv)
    values = [r["value"] for r in records.values()]
    metric = config["model"]["metric"]
    results = {
        "task": name,
        "metric": metric,
        "split": "test",
        "selection": next(iter(records.values()))["selection"],
        "folds": {f: r["value"] for f, r in records.items()} if folds_arg else None,
        "value": values[0] if len(values) == 1 else None,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "checkpoint": {f: r["checkpoint"] for f, r in records.items()},
        "metrics": {f: r["metrics"] for f, r in records.items()},
        "clips": {f: r["clips"] for f, r in records.items()},
        "init": config["model"]["init"],
        "mode": config["model"]["mode"],
        "config_hash": config_hash(base),
    }
    path = write_results(results, root)
    summary = f"{results['mean']:.4f}" + (f" +/- {results['std']:.4f}" if len(values) > 1 else "")
    print(f"{name}: test {metric} = {summary} over {len(values)} run(s) -> {path}")
    return 0
