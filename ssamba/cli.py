"""The `ssamba` command: one entry point, one subcommand per job.

Each subcommand lives in the module that owns the job and exposes
`main(argv: list[str]) -> int | None`; this file only routes, so `ssamba --help`
stays fast (no torch import) and adding a command touches one line.

Packages that build on ssamba add commands through the entry-point group
`ssamba.commands` (name = "module:function"); the corpus recipes in `data_prep` add
`ssamba shard` that way, so ssamba itself never imports them.
"""

from __future__ import annotations

import importlib
import os
import sys
from importlib.metadata import entry_points

# name -> (module:function, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "pretrain": ("ssamba.tasks.pretrain_cli:main", "self-supervised pretraining (LightningCLI)"),
    "finetune": ("ssamba.tasks.finetune_cli:main", "fine-tune / linear-probe on a labelled task"),
    "evaluate": (
        "ssamba.tasks.evaluate_cli:main",
        "evaluate a fine-tuned checkpoint, write results.json",
    ),
    "label-efficiency": (
        "ssamba.label_efficiency:main",
        "does pretraining help on my data? pretrained vs random init at several label budgets",
    ),
    "continual": ("ssamba.continual:main", "a sequence of tasks on one frozen encoder (adapters)"),
    "embed": ("ssamba.embed.cli:main", "embeddings for audio files or folders"),
    "predict": ("ssamba.predict:main", "label audio files with a fine-tuned classifier"),
    "export": (
        "ssamba.export:main",
        "write any checkpoint's encoder as an encoder file, HF folder, torch.export program or ONNX",
    ),
    "bench": ("ssamba.bench.__main__:main", "speed and memory benchmarks"),
}

USAGE = """usage: ssamba <command> [options]

Self-supervised audio representation learning with state-space models.
Typical workflow:
  make shards CORPUS=librispeech SRC=/data/LibriSpeech     # or: ssamba shard ...
  ssamba pretrain --config recipes/pretrain/asli_tiny.yaml
  ssamba finetune --config recipes/finetune/esc50.yaml --model.init runs/.../encoder.pt

commands:
{commands}

Run `ssamba <command> --help` for the options of one command.
"""


PLUGIN_GROUP = "ssamba.commands"


def commands() -> dict[str, tuple[str, str]]:
    """Built-in commands, then those other installed packages register (`PLUGIN_GROUP`)."""
    found = dict(COMMANDS)
    for entry in entry_points(group=PLUGIN_GROUP):
        if entry.name not in found:
            package = entry.module.split(".")[0]
            found[entry.name] = (entry.value, f"from {package}: `ssamba {entry.name} --help`")
    return found


def _usage() -> str:
    table = commands()
    width = max(len(name) for name in table)
    lines = [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in table.items()]
    return USAGE.format(commands="\n".join(lines))


def sleeping_openmp_threads() -> None:
    """Let idle OpenMP threads sleep rather than spin (unless the user chose otherwise).

    libgomp's threads spin between parallel regions by default. When the cores are also
    wanted by DataLoader workers (which decode and compute filterbanks) or by other jobs,
    the spinning threads steal their time: CPU pretraining steps ran 4-6x slower on a
    shared 2-core machine. Must run before torch is imported.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: list[str] | None = None) -> int:
    sleeping_openmp_threads()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(_usage())
        return 0
    if argv[0] in {"-V", "--version"}:
        from ssamba import __version__

        print(f"ssamba {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    table = commands()
    if name not in table:
        print(f"ssamba: unknown command {name!r}\n", file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    target, _ = table[name]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    result = func(rest)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
