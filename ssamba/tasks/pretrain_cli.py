"""`ssamba pretrain`: masked spectrogram patch modelling from a YAML recipe.

    ssamba pretrain --config recipes/pretrain/fsdd_tiny_cpu.yaml
    ssamba pretrain --config recipes/pretrain/asli_base.yaml --trainer.max_steps 100000
    ssamba pretrain --config recipes/pretrain/asli_base.yaml --ckpt_path last   # resume
    ssamba pretrain --config recipes/pretrain/asli_tiny.yaml --print_config
    ssamba pretrain --config recipes/pretrain/fsdd_tiny_cpu.yaml --model.encoder.depth 2
        (dotted options edit one field of the recipe's encoder piece)

A recipe has three sections: `model:` (PretrainTask: encoder piece from recipes/model/,
the objective, optimiser and schedule), `data:` (PretrainDataModule: shard folders,
mixing weights, batch size, `features`; the model's input length follows
`data.features.target_length`, which `auto` sizes from the first source's clip
durations) and `trainer:` (Lightning Trainer: steps, precision, devices, logger,
checkpoints). Any key can be overridden on the command line, e.g.
`--model.objective.n_masked 300` or `--trainer.devices 4 --trainer.strategy ddp`; a bad key or
value stops the run before any step with one line naming it (exit code 2).

Checkpoints go to `<logger folder>/checkpoints/`: last.ckpt at every validation and the
best by the recipe's monitor (val/acc in the published recipes; val/mse in the CPU
recipe, which trains the generative loss only). `--ckpt_path last` resumes the newest
last.ckpt in the same folder (step count, optimiser, learning-rate schedule and plateau
state; the data stream goes on with fresh clips), or starts from scratch when there is
none yet. At the end the encoder is exported to `<logger folder>/encoder.pt` for `ssamba
finetune` (with `--trainer.logger false`: to `trainer.default_root_dir`, by default
runs/pretrain/<recipe name>/).

Several processes: Lightning DDP (`--trainer.strategy ddp --trainer.devices N
[--trainer.num_nodes M]`), or the launchers in recipes/launch/ (torchrun.sh,
slurm.sbatch). `--trainer.callbacks+=ssamba.tasks.callbacks.BatchLog` records which
clips each rank trained on at each step.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jsonargparse import set_parsing_settings

from ssamba.data.pretrain import PretrainDataModule, ShardSource
from ssamba.data.transforms import linked_input_frames
from ssamba.tasks.cli_common import RunResult, build_cli, exit_code, logged_metrics
from ssamba.tasks.objectives.eat import EATConfig
from ssamba.tasks.pretrain import MSPMConfig, PretrainTask

PROG = "ssamba pretrain"
# Where a run with `--trainer.logger false` (and no trainer.default_root_dir) keeps its
# checkpoints and encoder.pt: `runs/pretrain/<recipe name>`, as the recipes' loggers do.
DEFAULT_ROOT = "runs/pretrain"


def source_input_frames(features: Any, sources: list[ShardSource] | None) -> int:
    """`model.input_frames` from `data.features` ("auto": the first source's durations)."""
    return linked_input_frames(features, sources[0]["shards"] if sources else None)


def pretrain(argv: Sequence[str] | None = None) -> RunResult:
    """Run one pretraining recipe (command-line arguments); returns the trained task, its
    last logged metrics and `files["encoder"]`, the exported encoder file (on rank 0).
    A bad recipe raises `SetupError` before any step."""
    # The objective's configs parse like classes: a recipe picks one by `class_path`,
    # dotted options edit the chosen one's fields, and printed configs name it.
    set_parsing_settings(subclasses_enabled=[MSPMConfig, EATConfig])
    cli = build_cli(
        PretrainTask,
        PretrainDataModule,
        argv,
        prog=PROG,
        description=__doc__,
        links=[(("data.features", "data.sources"), "model.input_frames", source_input_frames)],
        default_root=DEFAULT_ROOT,
    )
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=cli.config.get("ckpt_path"))
    files = {}
    if getattr(cli.model, "encoder_file", None) is not None:  # rank 0 exports it
        files["encoder"] = str(cli.model.encoder_file.resolve())
    best = (
        cli.trainer.checkpoint_callback.best_model_path if cli.trainer.checkpoint_callback else ""
    )
    if best:
        files["checkpoint"] = str(Path(best).resolve())
    return RunResult(cli.model, logged_metrics(cli.trainer), files)


def main(argv: Sequence[str] | None = None) -> int:
    """`ssamba pretrain`: exit code 0, or 2 with one line for a bad recipe."""

    def run() -> None:
        result = pretrain(argv)
        for kind, path in result.files.items():
            print(f"{kind}: {path}")

    return exit_code(run, PROG)
