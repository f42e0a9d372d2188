"""What every `ssamba` training front-end shares: one LightningCLI, run without subcommands.

`ssamba pretrain`, `ssamba finetune` and `ssamba evaluate` differ only in their
LightningModule, their DataModule and the Trainer method they call, so each builds its
run with `build_cli(TaskClass, DataClass, argv, ...)` (or `ClassifyCLI` on top of it),
returns a `RunResult` (model, metrics, files) to Python callers, and its `main` prints
it. Shared behaviour lives here:

- `--config` takes a recipe file, or a packaged recipe by name (`recipes/finetune/fsdd.yaml`
  works from any folder: `ssamba.recipe_paths.recipe_path`);
- recipes are YAML read with `parser_mode="omegaconf"` (so `${model.lr}` style
  interpolation works) and compose pieces: a top-level `defaults: [common/mspm.yaml,
  ../data/asli.yaml]` (paths relative to the recipe) applies those files first, in order,
  then the recipe's own keys on top, key by key, like repeated `--config` options;
- typed sub-configs (the dataclass `EncoderConfig` of `model.encoder`) take a YAML piece
  (`model.encoder: ../model/ssamba_tiny.yaml`, relative to the recipe), and dotted
  options (`--model.encoder.depth 2`) edit single fields of it, in every command alike;
  `--print_config` prints the merged values, a recipe that runs as it is;
- `--ckpt_path last` resumes the newest `last.ckpt` of the recipe's run folder whose run
  is this one (`RUN_KEYS` equal in its config.yaml: task, mode, init, data) *in that
  same folder*, and refuses in one line when every one there is another run's, so TensorBoard curves and checkpoints continue rather than fork; with no
  checkpoint yet it starts from scratch (as Lightning's own "last"), so a launcher that
  restarts a job can always pass it; a damaged `last.ckpt` (a full disk, a kill during a
  copy) is named and the newest intact checkpoint of the same version folder taken
  instead, or the run stops with one line;
- checkpoints are written atomically (`AtomicCheckpointIO`, installed in every trainer);
- a bad recipe fails before any training step with one line naming the key or path
  (`SetupError`; the CLIs exit with code 2) (unknown keys and mistyped values are rejected by
  jsonargparse; values the classes reject raise `ValueError` / `FileNotFoundError` from
  their constructors, the Trainer a `MisconfigurationException`);
- the run's config.yaml is written once training has started, and a `--ckpt_path` whose
  weights do not fit the model (another encoder size) is refused before that, with one
  line naming the tensors, so a resume that fails leaves the folder as it was; a
  checkpoint holding anything but tensors and plain containers is refused the same way
  (it is read with `weights_only=True`, as Lightning's restore then reads it again);
- `--trainer.logger false` without `trainer.default_root_dir` keeps the run's files in
  `<default_root>/<recipe name>` rather than the current directory;
- `--help` shows the command's description as written (examples one per line), and
  Lightning's advertising tips and its notice that the task's own ModelCheckpoint
  replaces the Trainer's default are not printed.
"""

from __future__ import annotations

import logging
import sys
import warnings
from argparse import ArgumentError, RawDescriptionHelpFormatter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import DefaultHelpFormatter, Namespace
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.plugins import CheckpointIO

from ssamba.files import UnwritableError, writable_folder
from ssamba.models.encoder_file import read_checkpoint
from ssamba.recipe_paths import recipe_path
from ssamba.tasks import say
from ssamba.tasks.checkpoint_io import AtomicCheckpointIO, checkpoint_damage

__all__ = [
    "SETUP_ERRORS",
    "RunResult",
    "SetupError",
    "SsambaCLI",
    "build_cli",
    "check_resume",
    "exit_code",
    "expand_defaults",
    "find_last_checkpoint",
    "logged_metrics",
    "peek_checkpoint",
    "setup_error_line",
]

# An argument link: (source, target) or (sources, target, compute_fn); see SsambaCLI.
Link = tuple[str, str] | tuple[str | tuple[str, ...], str, Callable[..., Any]]

# What building a run from a recipe raises for bad input: reported in one line, exit 2.
SETUP_ERRORS = (
    ArgumentError,
    ValueError,
    FileNotFoundError,
    MisconfigurationException,
    UnwritableError,
)

LAST = "last"
# The settings that make a run the same run: `--ckpt_path last` resumes only a version
# folder whose config.yaml has these as the command line does (a linear probe's
# last.ckpt fits a fine-tune's model, and Lightning would fail late, or worse, go on).
# Steps, devices and the encoder are left out: the first two may change on a resume,
# and an encoder that does not fit is named tensor by tensor by `check_resume`.
RUN_KEYS = (
    "task",
    "model.mode",
    "model.init",
    "model.objective",
    "data.shards",
    "data.sources",
    "data.features",
    "data.fold",
    "data.test_filter",
    "data.labels_per_class",
)
DEFAULTS_KEY = "defaults"
CONFIG_FLAGS = ("--config", "-c")


def recipe_pieces(recipe: Path, _seen: tuple[Path, ...] = ()) -> list[Path]:
    """`recipe` preceded by its `defaults` pieces (recursively), in the order to apply them."""
    recipe = recipe.resolve()
    if recipe in _seen:
        raise ValueError(
            f"{recipe}: `{DEFAULTS_KEY}` includes itself ({' -> '.join(map(str, _seen))})"
        )
    if not recipe.is_file():
        where = f" (listed in {_seen[-1]})" if _seen else ""
        raise FileNotFoundError(f"{recipe}: recipe not found{where}")
    content = yaml.safe_load(recipe.read_text()) or {}
    pieces = content.get(DEFAULTS_KEY) or [] if isinstance(content, dict) else []
    if isinstance(pieces, str):
        pieces = [pieces]
    ordered: list[Path] = []
    for piece in pieces:
        ordered += recipe_pieces(recipe.parent / piece, (*_seen, recipe))
    return [*ordered, recipe]


YAML_SUFFIXES = (".yaml", ".yml")


def expand_defaults(argv: Sequence[str]) -> list[str]:
    """Replace each `--config recipe` by one `--config` per piece, then the recipe; any
    other option's value that names one of ssamba's recipes (`--model.encoder
    recipes/model/ssamba_tiny.yaml` outside the checkout) by the recipe's path."""
    expanded: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            if value:
                expanded.append(f"{flag}={_recipe_or_value(value)}")
            else:
                expanded.append(_recipe_or_value(arg))
            continue
        value = value or next(args, "")
        # a YAML file must exist (else the one-line "recipe not found"); anything else is a
        # recipe's name or an inline YAML string, which jsonargparse reads
        recipe = recipe_path(value) if value.endswith(YAML_SUFFIXES) else _recipe_or_none(value)
        if recipe is None:
            expanded += [flag, value]
            continue
        for piece in recipe_pieces(recipe):
            expanded += [flag, str(piece)]
        # The pieces are merged by now: a printed or saved config must not list them again
        # (their paths are relative to recipes that a printed config no longer sits beside).
        expanded += [f"--{DEFAULTS_KEY}=null"]
    return expanded


def _recipe_or_none(value: str) -> Path | None:
    """The recipe `value` names (a file, or one of ssamba's by name), else None."""
    if not value or value.startswith(("-", "{", "[")) or "\n" in value:
        return None  # an option or inline YAML, never a recipe name
    try:
        return recipe_path(value)
    except (FileNotFoundError, OSError):
        return None


def _recipe_or_value(value: str) -> str:
    """A YAML file's path as given when it exists, or ssamba's recipe of that name."""
    if not value.endswith(YAML_SUFFIXES) or Path(value).exists():
        return value
    recipe = _recipe_or_none(value)
    return value if recipe is None else str(recipe)


class RecipeHelpFormatter(RawDescriptionHelpFormatter, DefaultHelpFormatter):
    """jsonargparse's help (types, defaults) with the description kept as written, so the
    example command lines of a command's docstring stay one per line."""


# Lightning's rank-zero notices that say nothing about the run: advertising for its cloud
# services, and (once per fit and per test) that ClassifyTask's ModelCheckpoint replaces
# the Trainer's default one, which is how every ssamba task keeps its checkpoints.
QUIET_NOTICES = (
    "💡 Tip:",
    "The following callbacks returned in `LightningModule.configure_callbacks`",
)


def _not_a_quiet_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith(QUIET_NOTICES)


def quiet_lightning() -> None:
    """Drop `QUIET_NOTICES` (idempotent); Lightning's other notices stay."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _not_a_quiet_notice not in logger.filters:
            logger.addFilter(_not_a_quiet_notice)


def setup_error_line(error: BaseException) -> str:
    """One line for an error found while building a run, with what to do where we know."""
    text = one_line(str(error))
    if isinstance(error, MisconfigurationException):
        text = f"trainer: {text}"
        if "gpu" in text.lower() or "cuda" in text.lower():
            text += " (no usable GPU here: pass --trainer.accelerator cpu, or auto)"
    return text


def peek_checkpoint(path: str | Path) -> dict[str, Any] | None:
    """A checkpoint's top-level dict, tensors memory-mapped rather than read (cheap even
    for large files); None when it is missing or cannot be read this way."""
    if not Path(path).is_file():
        return None
    try:
        payload = read_checkpoint(path, mmap=True)
    except (OSError, ValueError):  # not a zip checkpoint, or not tensors only
        return None
    return payload if isinstance(payload, dict) else None


def check_resume(model: torch.nn.Module, ckpt_path: str | Path | None) -> None:
    """Refuse a checkpoint whose weights do not fit `model` before training starts (and
    before config.yaml is rewritten), naming the tensors; Lightning would fail later,
    with a traceback, after the run folder was touched. Keys are checked only where
    Lightning's own restore is strict."""
    if ckpt_path is None:
        return
    try:
        payload = read_checkpoint(ckpt_path, mmap=True)
    except ValueError as error:  # pickled code, or not a checkpoint: one line, nothing run
        raise ValueError(f"--ckpt_path {error}") from None
    if not isinstance(payload, dict):
        raise ValueError(f"--ckpt_path {ckpt_path}: not a Lightning checkpoint (not a dict)")
    stored = payload.get("state_dict")
    if not isinstance(stored, dict):
        raise ValueError(f"--ckpt_path {ckpt_path}: not a Lightning checkpoint (no state_dict)")
    own = model.state_dict()
    problems = [
        f"{key} {tuple(stored[key].shape)} in the checkpoint, {tuple(own[key].shape)} here"
        for key in own
        if key in stored and tuple(stored[key].shape) != tuple(own[key].shape)
    ]
    if getattr(model, "strict_loading", True):
        problems += [f"{key} missing from the checkpoint" for key in own if key not in stored]
        problems += [f"{key} not in this model" for key in stored if key not in own]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ValueError(
            f"--ckpt_path {ckpt_path}: its weights do not fit this model (trained with "
            f"another encoder or task?): {'; '.join(problems[:3])}{more}"
        )


def check_output_folders(config: Any) -> None:
    """UnwritableError, one line naming the option, when a folder the run writes (its
    default_root_dir, its logger's save_dir) cannot be written; checked (and created) as
    the last step before training, so a run refused earlier leaves nothing behind."""
    trainer = config["trainer"]
    logger = trainer.get("logger")
    init = logger.get("init_args") if hasattr(logger, "get") else None
    folders = {
        "--trainer.default_root_dir": trainer.get("default_root_dir"),
        "--trainer.logger.init_args.save_dir": None if init is None else init.get("save_dir"),
    }
    for option, folder in folders.items():
        if folder is not None:
            writable_folder(str(folder), option)


def find_last_checkpoint(run_root: Path, config: dict[str, Any]) -> Path | None:
    """Newest `<run_root>/<version>/checkpoints/last.ckpt` of the run `config` describes
    (see `RUN_KEYS`); None when nothing was saved under `run_root`, ValueError naming the
    difference when every last.ckpt there is another run's."""
    candidates = sorted(
        run_root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    for last in candidates:
        if not run_differences(last.parent.parent / "config.yaml", config):
            return last
    if not candidates:
        return None
    differences = "; ".join(run_differences(candidates[0].parent.parent / "config.yaml", config))
    raise ValueError(
        f"--ckpt_path last: no run under {run_root} is this one (newest: {candidates[0]}, "
        f"{differences}); pass a checkpoint file to --ckpt_path, or leave it out to start "
        "a new run"
    )


def run_differences(saved_config: Path, config: dict[str, Any]) -> list[str]:
    """How the run whose config.yaml is `saved_config` differs from `config` in
    `RUN_KEYS` ("model.mode 'linear' there, 'finetune' here"); [] for the same run."""
    try:
        saved = yaml.safe_load(saved_config.read_text())
    except (OSError, yaml.YAMLError):
        return [f"{saved_config} unreadable"]
    differences = []
    for key in RUN_KEYS:
        there, here = _dotted(saved, key), _dotted(config, key)
        if there != here:
            differences.append(f"{key} {there!r} there, {here!r} here")
    return differences


def _dotted(config: Any, key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def intact_or_fallback(last: Path) -> Path:
    """`last` when it is intact; else, saying so on stderr, the newest intact checkpoint
    beside it (the same run's best or periodic ones); ValueError when there is none."""
    damage = checkpoint_damage(last)
    if damage is None:
        return last
    others = sorted(
        (p for p in last.parent.glob("*.ckpt") if p != last),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    fallback = next((p for p in others if checkpoint_damage(p) is None), None)
    if fallback is None:
        raise ValueError(
            f"--ckpt_path last: {last} is damaged ({damage}) and {last.parent} holds no "
            "intact checkpoint to resume from instead; move it away to start from scratch"
        )
    say(
        f"--ckpt_path last: {last} is damaged ({damage}); resuming from {fallback}, the "
        "newest intact checkpoint of that run",
        file=sys.stderr,
    )
    return fallback


class SaveConfigOnStart(SaveConfigCallback):
    """Lightning's SaveConfigCallback, writing once fitting has started rather than at setup:
    a checkpoint restore that fails (a resume with another encoder) comes in between, and
    must not leave a config.yaml that no checkpoint of the run matches. Testing or
    validating alone (`ssamba evaluate`) writes none: it is no run of the recipe's."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().setup(trainer, pl_module, "fit")


class SsambaCLI(LightningCLI):
    """LightningCLI without subcommands, plus `--ckpt_path` and argument links.

    `links` are `(source, target)` pairs such as `("data.multi_label", "model.multilabel")`,
    or `(sources, target, compute_fn)` triples computing the target from several values
    (the model's input length from `data.features` and the shard folder), so a value that
    two classes must agree on is written once.
    """

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule],
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
        args: Sequence[str],
        *,
        prog: str,
        description: str,
        links: Iterable[Link] = (),
        exit_on_error: bool = True,
        default_root: str | None = None,
    ) -> None:
        """`exit_on_error=False` raises `argparse.ArgumentError` for a bad recipe instead of
        printing the whole usage and exiting (`build_cli` turns it into one line).
        `default_root`: where a run without logger and `default_root_dir` keeps its files
        (`<default_root>/<recipe name>`); None leaves Lightning's current directory."""
        self._links = list(links)
        self._default_root = default_root
        quiet_lightning()
        # "Seed set to 0" on stderr before every run (and before any recipe error): the
        # seed is in the saved config.yaml already.
        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
        # Linear probes, adapters and the teacher-student objective keep their frozen parts
        # in eval mode on purpose; Lightning warns of it at every fit.
        warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
        super().__init__(
            model_class,
            datamodule_class,
            args=list(args),
            run=False,
            auto_configure_optimizers=False,  # tasks own their optimiser and schedule
            save_config_callback=SaveConfigOnStart,
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            parser_kwargs={
                "parser_mode": "omegaconf",
                "prog": prog,
                "description": description,
                "exit_on_error": exit_on_error,
                "formatter_class": RecipeHelpFormatter,
            },
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if isinstance(args, list | tuple):
            args = expand_defaults(args)
        with warnings.catch_warnings():
            # `args` is sys.argv with the recipe pieces expanded, on purpose; Lightning
            # warns whenever both are present.
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            super().parse_arguments(parser, args)
        # Pieces are applied by now; drop the list so the saved config.yaml stands alone.
        self.config[DEFAULTS_KEY] = None

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            f"--{DEFAULTS_KEY}",
            type=list[str] | None,
            default=None,
            help=(
                "Recipe pieces (YAML paths relative to the recipe) applied before the "
                "recipe's own keys; expanded by ssamba when the recipe is read."
            ),
        )
        parser.add_argument(
            "--ckpt_path",
            type=str | None,
            default=None,
            help=(
                "Resume training: 'last' continues the newest last.ckpt under the logger's "
                "run folder (same version folder, so logs continue; from scratch when there "
                "is none yet), or give a .ckpt path."
            ),
        )
        for source, target, *compute in self._links:
            parser.link_arguments(source, target, *compute)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The recipe's Trainer, saving checkpoints with `AtomicCheckpointIO` unless the
        recipe names a CheckpointIO plugin of its own."""
        plugins = self._get(self.config_init, "trainer", default={}).get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, list) else [plugins]
        if not any(isinstance(plugin, CheckpointIO) for plugin in plugins):
            plugins.append(AtomicCheckpointIO())
        return super().instantiate_trainer(**{"plugins": plugins, **kwargs})

    def before_instantiate_classes(self) -> None:
        self._keep_files_out_of_the_current_directory()
        self._validate_within_max_steps()
        self._refuse_differing_shared_settings()
        ckpt_path = self.config.get("ckpt_path")
        if ckpt_path == LAST:
            self._resume_in_last_version()
        elif ckpt_path is not None and not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"--ckpt_path: {ckpt_path} does not exist")
        elif ckpt_path is not None and (damage := checkpoint_damage(ckpt_path)) is not None:
            raise ValueError(f"--ckpt_path: {ckpt_path} is damaged ({damage})")

    def _validate_within_max_steps(self) -> None:
        """A run shorter than its validation interval validates at its last step: set
        `val_check_interval` to max_steps when it (or, unset, the data's epoch of
        `steps_per_epoch` batches) is longer, so a short run still reports val metrics
        and keeps a best checkpoint."""
        trainer = self.config.trainer
        max_steps = trainer.get("max_steps") or -1
        interval = trainer.get("val_check_interval")
        data = self.config.get("data")
        epoch = data.get("steps_per_epoch") if hasattr(data, "get") else None
        if interval is None:
            interval = epoch
        if max_steps > 0 and isinstance(interval, int) and interval > max_steps:
            trainer.val_check_interval = max_steps

    def _refuse_differing_shared_settings(self) -> None:
        """Lightning logs the model's and the data's settings as one set of hyperparameters
        and stops the run at its start with a traceback when a name both have differs
        (`seed`: `--model.seed 1` alone); refuse it here, in one line naming both keys."""
        model, data = self.config.get("model"), self.config.get("data")
        if not (isinstance(model, Namespace) and isinstance(data, Namespace)):
            return
        model_values, data_values = vars(model), vars(data)
        for key in sorted(model_values.keys() & data_values.keys()):
            if model_values[key] != data_values[key]:
                raise ValueError(
                    f"model.{key}={model_values[key]!r} and data.{key}={data_values[key]!r} "
                    "differ: Lightning logs both as one hyperparameter; set both "
                    f"(e.g. --model.{key} and --data.{key} to the same value)"
                )

    def _keep_files_out_of_the_current_directory(self) -> None:
        """Without a logger, Lightning writes checkpoints (and pretraining its encoder.pt)
        under `default_root_dir`, by default the current directory."""
        trainer = self.config.trainer
        if self._default_root is None or trainer.get("logger") or trainer.get("default_root_dir"):
            return
        configs = self.config.get("config") or []
        name = Path(str(configs[-1])).stem if configs else "run"
        trainer.default_root_dir = str(Path(self._default_root) / name)

    def _resume_in_last_version(self) -> None:
        """Point the logger at the version folder holding the newest `last.ckpt`."""
        logger = self.config.trainer.get("logger")
        init = logger.get("init_args") if hasattr(logger, "get") else None
        if init is None or init.get("save_dir") is None:
            raise ValueError(
                "--ckpt_path last needs trainer.logger with init_args.save_dir in the recipe "
                "(the run folder to search); pass a checkpoint path instead"
            )
        run_root = Path(str(init.save_dir)) / str(init.get("name") or "lightning_logs")
        dumped = self.parser.dump(self.config, skip_none=False, skip_validation=True)
        last = find_last_checkpoint(run_root, yaml.safe_load(dumped))
        if last is None:
            say(
                f"--ckpt_path last: no */checkpoints/last.ckpt under {run_root} yet; "
                "starting from scratch",
                file=sys.stderr,
            )
            self.config.ckpt_path = None
            return
        init.version = last.parent.parent.name
        self.config.ckpt_path = str(intact_or_fallback(last))


class SetupError(ValueError):
    """A recipe, override, checkpoint or data problem found before any step; one line."""


@dataclass
class RunResult:
    """What a training or scoring entry point returns to Python callers (the CLIs print it).

    model: the trained (or scored) LightningModule; metrics: the run's final logged values
    (e.g. `val/acc`, `test/acc`); files: what the run wrote, by kind (e.g. `encoder`,
    `results`), as absolute paths; record: the results.json content where there is one.
    """

    model: LightningModule
    metrics: dict[str, float]
    files: dict[str, str] = field(default_factory=dict)
    record: dict[str, Any] | None = None


def build_cli(
    model_class: type[LightningModule] | Callable[..., LightningModule],
    datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    links: Iterable[Link] = (),
    default_root: str | None = None,
) -> SsambaCLI:
    """Parse a recipe and build task + data + trainer. Errors raised while parsing and
    building (before any step runs) become one-line `SetupError`s; `--help` and
    `--print_config` raise SystemExit."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli = SsambaCLI(
            model_class,
            datamodule_class,
            argv,
            prog=prog,
            description=description,
            links=links,
            exit_on_error=False,
            default_root=default_root,
        )
        check_resume(cli.model, cli.config.get("ckpt_path"))
        check_output_folders(cli.config)
    except SETUP_ERRORS as error:
        raise SetupError(setup_error_line(error)) from error
    return cli


def logged_metrics(trainer: Trainer) -> dict[str, float]:
    """The trainer's last logged value of every metric, as floats."""
    return {name: float(value) for name, value in trainer.callback_metrics.items()}


def exit_code(run: Callable[[], Any], prog: str) -> int:
    """Run an entry point for its CLI: 0, or 2 with one `prog: error:` line for a
    `SetupError` (errors during training keep their traceback); `--help` exits 0."""
    try:
        run()
    except SystemExit as exit_:  # --help and --print_config
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except SetupError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    return 0


def one_line(message: str) -> str:
    """A possibly multi-line parser message on one line (jsonargparse lists the reasons a
    value failed each type of a union on lines of their own)."""
    text = ""
    for line in message.splitlines():
        line = line.strip().removeprefix("- ").strip()  # a bullet, not an option's "--"
        if line:
            text += (" " if not text or text.endswith(":") else "; ") + line
    return text.strip()
