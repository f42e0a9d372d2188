"""What every `ssamba` training front-end shares: one LightningCLI, run without subcommands.

`ssamba pretrain`, `ssamba finetune` and `ssamba evaluate` differ only in their
LightningModule, their DataModule and the Trainer method they call, so each is
`run_cli(TaskClass, DataClass, argv, ...)`. Shared behaviour lives here:

- recipes are YAML read with `parser_mode="omegaconf"` (so `${model.n_masked}` style
  interpolation works) and compose pieces: a top-level `defaults: [common/mspm.yaml,
  ../data/asli.yaml]` (paths relative to the recipe) applies those files first, in order,
  then the recipe's own keys on top, key by key, like repeated `--config` options;
- a setting typed `dict | YamlPiece` (e.g. `model.encoder: ../model/ssamba_tiny.yaml`) is
  read into a dict while the recipe is parsed, so `--model.encoder.depth 2` edits the
  piece instead of replacing it, and the saved config.yaml holds the merged values;
- `--ckpt_path last` resumes the newest `last.ckpt` of the recipe's run folder *in that
  same folder*, so TensorBoard curves and checkpoints continue rather than fork; with no
  checkpoint yet it starts from scratch (as Lightning's own "last"), so a launcher that
  restarts a job can always pass it;
- with `run_cli`, a bad recipe fails before any training step with one line naming the
  key or path and exit code 2 (unknown keys and mistyped values are rejected by
  jsonargparse; values the classes reject raise `ValueError` / `FileNotFoundError` from
  their constructors).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from argparse import ArgumentError
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from jsonargparse.typing import Path_fr, register_type
from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

__all__ = [
    "SsambaCLI",
    "YamlPiece",
    "expand_defaults",
    "find_last_checkpoint",
    "read_yaml_piece",
    "run_cli",
]

LAST = "last"
DEFAULTS_KEY = "defaults"
CONFIG_FLAGS = ("--config", "-c")


def read_yaml_piece(piece: dict[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A setting given inline (dict) or as a YAML file (e.g. `encoder: ../model/ssamba_tiny.yaml`).

    Type the argument `dict | Path_fr` and jsonargparse resolves a path written in a recipe
    against the recipe's folder; `os.fspath` keeps that resolution (`str` would not).
    """
    if isinstance(piece, dict):
        return dict(piece)
    path = Path(os.fspath(piece))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: recipe piece not found")
    loaded = yaml.safe_load(path.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping of settings, got {type(loaded).__name__}")
    return loaded


class YamlPiece(str):
    """Type of a setting given as the path of a YAML piece, read into a dict when parsed.

    Annotate a parameter `dict[str, Any] | YamlPiece`: a path in a recipe is resolved
    against the recipe's folder and replaced by the file's mapping at parse time, so later
    dotted options (`--model.encoder.depth 2`) update that mapping key by key. Typed
    `dict | Path_fr` instead, jsonargparse keeps the path and a dotted option replaces it
    with a dict holding only the new key.
    """


def _read_piece_at_parse_time(value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return value
    try:
        path = Path_fr(os.fspath(value))  # relative to the recipe being parsed
    except TypeError as error:
        raise ValueError(f"{value}: recipe piece not found ({error})") from error
    return read_yaml_piece(path)


register_type(YamlPiece, serializer=str, deserializer=_read_piece_at_parse_time)


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


def expand_defaults(argv: Sequence[str]) -> list[str]:
    """Replace each `--config recipe.yaml` by one `--config` per piece, then the recipe."""
    expanded: list[str] = []
    args = iter(argv)
    for arg in args:
        flag, _, value = arg.partition("=")
        if flag not in CONFIG_FLAGS:
            expanded.append(arg)
            continue
        value = value or next(args, "")
        path = Path(value)
        if not value.endswith((".yaml", ".yml")) or not path.is_file():
            expanded += [flag, value]  # an inline YAML string or a missing file: jsonargparse says
            continue
        for piece in recipe_pieces(path):
            expanded += [flag, str(piece)]
    return expanded


def find_last_checkpoint(run_root: Path) -> Path | None:
    """Newest `<run_root>/<version>/checkpoints/last.ckpt`, or None when nothing was saved."""
    candidates = sorted(run_root.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


class SsambaCLI(LightningCLI):
    """LightningCLI without subcommands, plus `--ckpt_path` and argument links.

    `links` are `(source, target)` pairs such as `("data.target_length",
    "model.input_frames")`, so a value that two classes must agree on is written once.
    """

    def __init__(
        self,
        model_class: type[LightningModule] | Callable[..., LightningModule],
        datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
        args: Sequence[str],
        *,
        prog: str,
        description: str,
        links: Iterable[tuple[str, str]] = (),
        exit_on_error: bool = True,
    ) -> None:
        """`exit_on_error=False` raises `argparse.ArgumentError` for a bad recipe instead of
        printing the whole usage and exiting (`run_cli` turns it into one line)."""
        self._links = list(links)
        # "Seed set to 0" on stderr before every run (and before any recipe error): the
        # seed is in the saved config.yaml already.
        logging.getLogger("lightning.fabric.utilities.seed").setLevel(logging.WARNING)
        super().__init__(
            model_class,
            datamodule_class,
            args=list(args),
            run=False,
            auto_configure_optimizers=False,  # tasks own their optimiser and schedule
            save_config_kwargs={"overwrite": True},  # a resumed run rewrites its config.yaml
            parser_kwargs={
                "parser_mode": "omegaconf",
                "prog": prog,
                "description": description,
                "exit_on_error": exit_on_error,
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
        for source, target in self._links:
            parser.link_arguments(source, target)

    def before_instantiate_classes(self) -> None:
        if self.config.get("ckpt_path") == LAST:
            self._resume_in_last_version()

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
        last = find_last_checkpoint(run_root)
        if last is None:
            print(
                f"--ckpt_path last: no */checkpoints/last.ckpt under {run_root} yet; "
                "starting from scratch",
                file=sys.stderr,
            )
            self.config.ckpt_path = None
            return
        init.version = last.parent.parent.name
        self.config.ckpt_path = str(last)


def run_cli(
    model_class: type[LightningModule] | Callable[..., LightningModule],
    datamodule_class: type[LightningDataModule] | Callable[..., LightningDataModule],
    argv: Sequence[str] | None,
    *,
    prog: str,
    description: str,
    trainer_fn: str = "fit",
    links: Iterable[tuple[str, str]] = (),
) -> int:
    """Parse a recipe, build task + data + trainer, call `trainer.<trainer_fn>`; exit code.

    Errors raised while parsing and building (before any step runs) become one
    `prog: error:` line and exit code 2, like argparse; errors during training keep their
    traceback.
    """
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
        )
    except SystemExit as exit_:  # --help and --print_config
        return int(exit_.code or 0) if not isinstance(exit_.code, str) else 2
    except (ArgumentError, ValueError, FileNotFoundError) as error:
        print(f"{prog}: error: {one_line(str(error))}", file=sys.stderr)
        return 2
    getattr(cli.trainer, trainer_fn)(
        cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path")
    )
    return 0


def one_line(message: str) -> str:
    """A possibly multi-line parser message on one line (jsonargparse lists the reasons a
    value failed each type of a union on lines of their own)."""
    text = ""
    for line in (line.strip(" -") for line in message.splitlines()):
        if line:
            text += (" " if not text or text.endswith(":") else "; ") + line
    return text.strip()
