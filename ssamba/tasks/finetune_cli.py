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
overstates the result; we do not. A run that ends before its first validation (a short
`--trainer.max_steps`) tests its last weights, and `selection` in results.json says so.
Each fold's tested checkpoint is also written as an encoder file with its head and
labels (`encoder.pt` beside the checkpoints).

Several processes: `--trainer.strategy ddp --trainer.devices N` (gloo on CPU). Each
process trains on its own batches, every validation and test clip is scored once over
all of them and the metrics are gathered, so the test result equals one process's
evaluation of the same checkpoint; only rank 0 writes results and encoder files.

Every run gets a folder of its own, `<trainer.default_root_dir>/run-<N>/` (N is the
number of its logs' `version_<N>` folder, from 0; a resume keeps its old one), whose
`results.json` holds the task, metric, per-fold test values, mean, std (ddof=1), how the
checkpoint was selected, the checkpoints tested, the clips per subset and the config hash;
`<trainer.default_root_dir>/index.jsonl` gets one line per run, so no run is ever lost.
"""

from __future__ import annotations

import copy
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
from ssamba.data.loader import rank_batches
from ssamba.data.transforms import linked_input_frames
from ssamba.features import FeatureConfig
from ssamba.files import atomic_write_text
from ssamba.models.encoder_file import load_encoder_file
from ssamba.tasks import say
from ssamba.tasks.callbacks import EpochWeightAveraging
from ssamba.tasks.classify import ClassifyTask
from ssamba.tasks.cli_common import (
    SETUP_ERRORS,
    RunResult,
    SetupError,
    SsambaCLI,
    check_output_folders,
    check_resume,
    exit_code,
    one_line,
    setup_error_line,
)

PROG = "ssamba finetune"
DESCRIPTION = __doc__  # `--help` (inside ClassifyCLI, `__doc__` is the class's docstring)
FOLDS_ALL = "all"
RESULTS_NAME = "results.json"
INDEX_NAME = "index.jsonl"


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
        description: str | None = None,
    ) -> None:
        self.parse_only = parse_only
        super().__init__(
            ClassifyTask,
            LabelledDataModule,
            args,
            prog=prog,
            description=DESCRIPTION if description is None else description,
            links=[
                (("data.features", "data.shards"), "model.input_frames", linked_input_frames),
                ("data.multi_label", "model.multilabel"),
            ],
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


def config_hash(cli: LightningCLI, config: Namespace | None = None) -> str:
    """12 hex digits of sha256 over the merged config: equal runs, equal hash."""
    config = cli.config if config is None else config
    dumped = cli.parser.dump(config, skip_none=False, skip_validation=True)
    return hashlib.sha256(dumped.encode()).hexdigest()[:12]


def _numbers(folder: Path, prefix: str) -> list[int]:
    return [
        int(p.name[len(prefix) :])
        for p in folder.glob(f"{prefix}*")
        if p.name[len(prefix) :].isdigit()
    ]


def next_run_number(root: Path, log_roots: list[Path]) -> int:
    """The first N free both as `root/run-N` and as `version_N` in every log folder, so
    a run's results folder and its Lightning logs carry the same number (0 for the first)."""
    taken = _numbers(root, "run-") + [n for log in log_roots for n in _numbers(log, "version_")]
    return max(taken, default=-1) + 1


def log_root(config: Namespace) -> Path | None:
    """The folder holding a run's `version_N` folders (logger save_dir/name); None without."""
    logger = config["trainer"].get("logger")
    init = logger.get("init_args") if isinstance(logger, Namespace) else None
    if init is None or init.get("save_dir") is None:
        return None
    return Path(str(init["save_dir"])) / str(init.get("name") or "lightning_logs")


def new_run_folder(root: Path, number: int | None = None) -> Path:
    """`root/run-<number>` (default: one past the highest taken), or the next free number
    when another run took it meanwhile; created here (so two runs never share one)."""
    root.mkdir(parents=True, exist_ok=True)
    if number is None:
        number = max(_numbers(root, "run-"), default=0) + 1
    while True:
        folder = root / f"run-{number}"
        try:
            folder.mkdir()
            return folder
        except FileExistsError:  # another run took it meanwhile
            number += 1


def write_results(results: dict[str, Any], directory: Path) -> Path:
    return atomic_write_text(directory / RESULTS_NAME, json.dumps(results, indent=2) + "\n")


def append_index(root: Path, results: dict[str, Any], path: Path) -> None:
    """One line per run in `root/index.jsonl`: what ran, its score, where its results are."""
    keys = ("task", "metric", "mean", "std", "init", "mode", "config_hash")
    line = {k: results.get(k) for k in keys} | {"results": str(path)}
    with (root / INDEX_NAME).open("a") as index:
        index.write(json.dumps(line) + "\n")


def latest_results(root: str | Path) -> Path:
    """results.json of the newest run under a task's root folder (from its index)."""
    index = Path(root) / INDEX_NAME
    if not index.is_file():
        raise FileNotFoundError(f"{index}: no run has finished under {root}")
    return Path(json.loads(index.read_text().splitlines()[-1])["results"])


class RecipeError(SetupError):
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


def fold_configs(config: Namespace, root: Path) -> dict[str, Namespace]:
    """fold name -> the parsed config of its run; `{"-": config}` without `--folds`.

    A fold's config is the recipe's with the fold key set, its own root folder and its
    logs under `<logger name>/fold-<fold>/version_*`.
    """
    if config["folds"] is None:
        return {"-": config}
    cross_validation = config["cross_validation"]
    selected = select_folds(config["folds"], cross_validation)
    key = cross_validation["key"]
    configs = {}
    for fold, value in selected.items():
        fold_config = copy.deepcopy(config)
        fold_config[key] = value
        fold_config["trainer"]["default_root_dir"] = str(root / f"fold-{fold}")
        logger = fold_config["trainer"].get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is not None:
            init["name"] = f"{init.get('name') or 'lightning_logs'}/fold-{fold}"
        configs[fold] = fold_config
    return configs


def number_the_run(configs: dict[str, Namespace], root: Path) -> int:
    """Pick the run's number and log every fold that starts afresh under `version_<it>`
    (a `--ckpt_path last` resume keeps its own version folder); returns the number."""
    roots = [r for r in map(log_root, configs.values()) if r is not None]
    number = next_run_number(root, roots)
    for config in configs.values():
        logger = config["trainer"].get("logger")
        init = logger.get("init_args") if isinstance(logger, Namespace) else None
        if init is not None and init.get("version") is None:  # unless the user named one
            init["version"] = number
    return number


def check_data(config: Namespace) -> dict[str, int]:
    """Build only the data of a run and split it: a bad fold fails before any training."""
    data = config["data"].as_dict()
    try:
        data["features"] = FeatureConfig(**(data.get("features") or {}))
        return LabelledDataModule(**data).split_clips()
    except (ValueError, FileNotFoundError, TypeError) as error:
        raise RecipeError(one_line(str(error))) from error


def fold_hint(message: str, config: Namespace) -> str:
    """`message`, plus how this recipe picks its test fold when `data.fold` was the problem
    (a cross-validation recipe may select folds by another key, as FSDD LOSO by speaker)."""
    cross_validation = config.get("cross_validation") or {}
    key = cross_validation.get("key")
    if not message.startswith("fold:") or not key or key == "data.fold":
        return message
    folds = cross_validation.get("folds") or []
    names = ", ".join(map(str, folds))
    return (
        f"{message}. This recipe selects its test fold with {key}, not data.fold: "
        f"run `--folds <name>` (or all) with a fold among {names}"
    )


def check_batches(counts: dict[str, int], batch_size: int, world: int, config: Namespace) -> None:
    """Every rank needs one batch of each subset. Checked here, before DDP starts the
    other processes: a rank that found none would stop alone and leave the others waiting."""
    for subset, clips in counts.items():
        if clips and any(
            rank_batches(clips, batch_size, rank, world, drop_last=subset == "train") == 0
            for rank in range(world)
        ):
            raise RecipeError(
                f"{config['data']['shards']}: the {subset} set has {clips} clips, too few for "
                f"one batch of {batch_size} on each of {world} processes (lower "
                "--data.batch_size or --trainer.devices)"
            )


def build(cli: ClassifyCLI, config: Namespace) -> dict[str, int]:
    """Instantiate model, data and trainer of `config` in `cli`, with the data split
    checked before any step; returns the clips per subset. Construction errors (a
    checkpoint of the wrong family or size, a missing file, a label outside labels.csv)
    become a `RecipeError` naming the key, file or clip."""
    cli.config, cli.parse_only = config, False
    try:
        cli.before_instantiate_classes()
        cli.instantiate_classes()
        check_resume(cli.model, cli.config.get("ckpt_path"))
        counts = cli.datamodule.split_clips()  # every subset the run will read
        check_output_folders(cli.config)
    except SETUP_ERRORS as error:
        raise RecipeError(fold_hint(setup_error_line(error), config)) from error
    check_batches(counts, cli.datamodule.hparams.batch_size, cli.trainer.world_size, config)
    say("clips: " + ", ".join(f"{name} {n}" for name, n in counts.items()), flush=True)
    return counts


def run_one(cli: ClassifyCLI, config: Namespace) -> dict[str, Any]:
    """Fit one configuration, then test its selected checkpoint; returns the record."""
    counts = build(cli, config)
    model, trainer, data = cli.model, cli.trainer, cli.datamodule
    trainer.fit(model, datamodule=data, ckpt_path=config.get("ckpt_path"))
    averaging = [cb for cb in trainer.callbacks if isinstance(cb, EpochWeightAveraging)]
    validation = data.predicates["val"]
    if averaging:
        window = f"{averaging[0].first_epoch}-{averaging[0].last_epoch}"
        ckpt, selection = averaging[0].averaged_path, f"average of epochs {window}"
    elif validation is None:
        ckpt, selection = trainer.checkpoint_callback.last_model_path, "last epoch (no val set)"
    elif trainer.checkpoint_callback.best_model_path:
        ckpt = trainer.checkpoint_callback.best_model_path
        where = "the test set (as SSAST)" if validation == data.predicates["test"] else validation
        selection = f"best val/{model.hparams.metric} epoch, val = {where}"
    else:  # training ended before the first validation (max_steps, limits, val interval)
        ckpt = trainer.checkpoint_callback.last_model_path
        if not ckpt and trainer.checkpoint_callback.dirpath:  # e.g. a resume that ended at once
            ckpt = str(Path(trainer.checkpoint_callback.dirpath) / "end.ckpt")
            trainer.save_checkpoint(ckpt)  # every rank calls it; rank 0 writes
        selection = (
            f"last step {trainer.global_step} (training ended before any validation, so "
            "no epoch could be chosen: check max_steps / val_check_interval)"
        )
        say(f"{PROG}: warning: no validation ran; testing {selection}", file=sys.stderr)
    if not ckpt:
        raise RuntimeError("no checkpoint was saved: is trainer.enable_checkpointing false?")
    metric = f"test/{model.hparams.metric}"
    scores = trainer.test(model, datamodule=data, ckpt_path=ckpt, verbose=False)[0]
    encoder_file = None
    if trainer.is_global_zero:  # the tested classifier, usable by every consumer
        if model.hparams.mode == "adapter":  # ClassifyTask.on_test_end wrote it
            encoder_file = str((Path(ckpt).parent.parent / "adapters.pt").resolve())
        else:
            bundle = load_encoder_file(ckpt)
            encoder_file = str(bundle.save(Path(ckpt).parent.parent / "encoder.pt").resolve())
    return {
        "value": float(scores[metric]),
        "metrics": {k: float(v) for k, v in scores.items()},
        "checkpoint": str(Path(ckpt).resolve()),
        "encoder_file": encoder_file,
        "selection": selection,
        "clips": counts,
    }


def finetune(argv: list[str] | None = None) -> RunResult:
    """Run a recipe (each requested fold; command-line arguments) and return the last fold's
    task, its test metrics, the files written (`results`, `encoder` of each fold) and the
    results.json record. A bad recipe raises `RecipeError` before any training."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = ClassifyCLI(argv, parse_only=True)
    except ArgumentError as error:
        raise RecipeError(one_line(str(error))) from error
    config = cli.config
    root = Path(config["trainer"]["default_root_dir"] or ".")
    name = task_name(config)
    folds = fold_configs(config, root)
    number = number_the_run(folds, root)
    if len(folds) > 1:  # a fold whose data or settings are wrong fails before fold 1 trains
        for fold_config in folds.values():
            check_data(fold_config)
    records = {}
    for fold, fold_config in folds.items():
        if fold != "-":
            say(f"== {name}: fold {fold} ({len(records) + 1}/{len(folds)})")
        records[fold] = run_one(cli, fold_config)
    values = [r["value"] for r in records.values()]
    metric = config["model"]["metric"]
    results = {
        "task": name,
        "metric": metric,
        "split": "test",
        "selection": next(iter(records.values()))["selection"],
        "folds": {f: r["value"] for f, r in records.items()} if config["folds"] else None,
        "value": values[0] if len(values) == 1 else None,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "checkpoint": {f: r["checkpoint"] for f, r in records.items()},
        "encoder_file": {f: r["encoder_file"] for f, r in records.items()},
        "metrics": {f: r["metrics"] for f, r in records.items()},
        "clips": {f: r["clips"] for f, r in records.items()},
        "init": config["model"]["init"],
        "mode": config["model"]["mode"],
        "config_hash": config_hash(cli),
    }
    metrics = records[fold]["metrics"] | {"mean": results["mean"], "std": results["std"]}
    if not cli.trainer.is_global_zero:  # one results file per run, not per process
        return RunResult(cli.model, metrics, {}, results)
    path = write_results(results, new_run_folder(root, number))
    append_index(root, results, path)
    files = {"results": str(path.resolve())}
    files |= {
        ("encoder" if f == "-" else f"encoder/{f}"): r["encoder_file"]
        for f, r in records.items()
        if r["encoder_file"]
    }
    return RunResult(cli.model, metrics, files, results)


def main(argv: list[str] | None = None) -> int:
    """`ssamba finetune`: exit code 0, or 2 with one line for a bad recipe."""

    def run() -> None:
        result = finetune(argv)
        record = result.record or {}
        if "results" in result.files:
            runs = len(record["checkpoint"])
            spread = f" +/- {record['std']:.4f}" if runs > 1 else ""
            print(
                f"{record['task']}: test {record['metric']} = {record['mean']:.4f}{spread} "
                f"over {runs} run(s) -> {result.files['results']}"
            )

    return exit_code(run, PROG)
