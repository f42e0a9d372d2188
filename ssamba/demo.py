"""`make demo`: the whole pipeline on the Free Spoken Digit Dataset, on a laptop CPU.

    python -m ssamba.demo --fsdd ../shared/data/fsdd --work work/demo [--quick]

1. shard FSDD (3,000 spoken digits, 6 speakers) into WebDataset tars   `ssamba shard`
2. pretrain a small SSAMBA (ssamba-tiny's design, 4 layers x 64) with  `ssamba pretrain`
   masked spectrogram patch modelling (recipes/pretrain/fsdd_tiny_cpu.yaml)
3. fine-tune and linear-probe the pretrained encoder and the same      `ssamba finetune`
   encoder from random init, on the official split (recording index
   0-4 = test) and leave-one-speaker-out (LOSO)
4. print one table (accuracy per init x mode x split, minutes taken), write it as
   results.md / results.json, plot it to results.png, and say where the logs are.

Every stage runs the real command line in a subprocess, so what the demo does is what a
user types (each command is printed) and its progress bars show as they run. FSDD is
read from `--fsdd`, else `$SSAMBA_FSDD`, else cloned from GitHub into the work folder
(the demo's only network use). `--quick` trains far less and runs 2 LOSO folds: a smoke
test of the pipeline, not a result.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
PRETRAIN_RECIPE = REPO / "recipes" / "pretrain" / "fsdd_tiny_cpu.yaml"
SPLITS = {  # split name -> fine-tuning recipe
    "official": REPO / "recipes" / "finetune" / "fsdd.yaml",
    "loso": REPO / "recipes" / "finetune" / "fsdd_loso.yaml",
}
INITS = ("pretrained", "random")
MODES = ("finetune", "linear")


class DemoError(RuntimeError):
    """A stage that cannot run or failed; the message says which and what to do."""


@dataclass(frozen=True)
class Budget:
    """How much each stage trains, as command-line overrides of the recipes."""

    pretrain: tuple[str, ...]
    finetune: tuple[str, ...]
    loso: tuple[str, ...]  # on top of `finetune`, for each leave-one-speaker-out fold
    loso_folds: str  # "all" or a comma list of speakers


# 24 LOSO folds (2 inits x 2 modes x 6 speakers) cost what 24 official-split runs do:
# at the recipe's 10 epochs the demo took 41 minutes here, so folds train fewer.
LOSO_EPOCHS = 5
FULL = Budget(
    pretrain=(), finetune=(), loso=(f"--trainer.max_epochs={LOSO_EPOCHS}",), loso_folds="all"
)
QUICK = Budget(
    pretrain=("--trainer.max_steps=30", "--trainer.val_check_interval=30"),
    finetune=("--trainer.max_epochs=1", "--trainer.limit_train_batches=8"),
    loso=(),
    loso_folds="george,theo",
)


@dataclass
class Run:
    """One cell of the results table."""

    init: str
    mode: str
    split: str
    mean: float
    std: float
    folds: int
    minutes: float
    log_dir: Path


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work: Path = args.work.resolve()
    budget = QUICK if args.quick else FULL
    started = time.monotonic()
    try:
        fsdd = locate_fsdd(args.fsdd, work)
        shards = work / "shards" / "fsdd"
        run_stage(
            "1/3 shard FSDD",
            ["shard", "--corpus", "fsdd", "--src", str(fsdd), "--out", str(shards)],
            ["--workers", "2"],
        )
        encoder = pretrain(shards, work, budget)
        runs = [
            finetune(encoder, shards, work, budget, init, mode, split)
            for split in SPLITS
            for init in INITS
            for mode in MODES
        ]
    except DemoError as err:
        print(f"\nssamba demo: {err}", file=sys.stderr)
        return 1
    report(runs, work, (time.monotonic() - started) / 60, args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssamba.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fsdd", type=Path, help="FSDD folder (with recordings/)")
    parser.add_argument("--work", type=Path, default=Path("work/demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="minutes, not half an hour")
    return parser


# ---------------------------------------------------------------------------- stages
def locate_fsdd(requested: Path | None, work: Path) -> Path:
    """The first FSDD folder among --fsdd, $SSAMBA_FSDD and an earlier clone; else clone it."""
    candidates = [requested, os.environ.get("SSAMBA_FSDD"), work / "fsdd"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "recordings").is_dir():
            return Path(candidate).resolve()
    target = work / "fsdd"
    print(f"FSDD not found at {requested}; cloning {FSDD_URL} into {target}", flush=True)
    if shutil.which("git") is None:
        raise DemoError(
            f"git is not installed: download {FSDD_URL} yourself and pass --fsdd <folder>"
        )
    shutil.rmtree(target, ignore_errors=True)  # an interrupted clone
    command = ["git", "clone", "--depth", "1", FSDD_URL, str(target)]
    if subprocess.run(command, check=False).returncode != 0:
        raise DemoError(f"`{shlex.join(command)}` failed: pass --fsdd <folder> instead")
    return target


def pretrain(shards: Path, work: Path, budget: Budget) -> Path:
    """Pretrain with the CPU recipe; returns the exported encoder file."""
    out = work / "pretrain"
    shutil.rmtree(out, ignore_errors=True)  # encoder.pt must come from this run
    run_stage(
        "2/3 pretrain SSAMBA (fsdd_tiny_cpu recipe)",
        ["pretrain", "--config", str(PRETRAIN_RECIPE)],
        [*pretrain_data_args(shards, out), *budget.pretrain],
    )
    found = sorted(out.rglob("encoder.pt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DemoError(f"pretraining finished but wrote no encoder.pt under {out}")
    return found[-1]


def pretrain_data_args(shards: Path, out: Path) -> list[str]:
    """Point the recipe at the demo's shards and output folder."""
    return [
        f"--data.sources=[{{shards: {shards}, splits: [train]}}]",
        f"--data.val={{shards: {shards}, splits: [test]}}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
    ]


def finetune(
    encoder: Path, shards: Path, work: Path, budget: Budget, init: str, mode: str, split: str
) -> Run:
    """One fine-tuning run (all its folds for LOSO); returns its row of the table."""
    out = work / "finetune" / split / f"{init}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    options = [
        f"--data.shards={shards}",
        f"--model.mode={mode}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        *init_args(encoder, init),
        *budget.finetune,
    ]
    if split == "loso":
        options += [*budget.loso, f"--folds={budget.loso_folds}"]
    title = f"3/3 {mode} {init} encoder, {split} split"
    minutes = run_stage(title, ["finetune", "--config", str(SPLITS[split])], options)
    results = read_results(out / "results.json")
    folds = len(results["folds"]) if results.get("folds") else 1
    return Run(init, mode, split, results["mean"], results["std"], folds, minutes, out)


def init_args(encoder: Path, init: str) -> list[str]:
    """The pretrained file, or random weights in exactly the architecture it holds."""
    if init == "pretrained":
        return [f"--model.init={encoder}"]
    from ssamba.models.checkpoints import load_encoder

    cfg = load_encoder(encoder).cfg.to_dict()
    # every field is given, so the preset size is only a starting point that gets overridden
    spec = {"size": "tiny", **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}
    return ["--model.init=random", f"--model.encoder={json.dumps(spec)}"]


def run_stage(title: str, command: list[str], options: list[str]) -> float:
    """Run `ssamba <command> <options>` with live output; returns minutes taken."""
    argv = [sys.executable, "-m", "ssamba", *command, *options]
    print(f"\n=== {title}\n$ {shlex.join(argv[2:])}", flush=True)
    started = time.monotonic()
    code = subprocess.run(argv, cwd=REPO, check=False).returncode
    minutes = (time.monotonic() - started) / 60
    if code != 0:
        raise DemoError(f"stage '{title}' failed (exit {code}); its output is above")
    print(f"=== {title}: done in {minutes:.1f} min", flush=True)
    return minutes


def read_results(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DemoError(f"{path}: missing; `ssamba finetune` should have written it")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------- report
def report(runs: list[Run], work: Path, minutes: float, quick: bool) -> None:
    """Print the table, write results.md/.json and results.png, name the log folders."""
    table = format_table(runs, minutes, quick)
    print("\n" + table)
    (work / "results.md").write_text(table + "\n")
    rows = [{**run.__dict__, "log_dir": str(run.log_dir)} for run in runs]
    (work / "results.json").write_text(json.dumps({"minutes": minutes, "runs": rows}, indent=2))
    plot = plot_results(runs, work / "results.png")
    print(f"\ntable:       {work / 'results.md'}")
    print(f"plot:        {plot}")
    print(f"logs:        tensorboard --logdir {work}   (pretraining curves and reconstructions,")
    print("             fine-tuning loss/accuracy per run and fold)")


def format_table(runs: list[Run], minutes: float, quick: bool) -> str:
    """Markdown table: accuracy (mean +/- std over folds) per init x mode x split."""
    lines = [
        "| init | mode | split | test accuracy | folds | minutes |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        spread = f" ± {run.std * 100:.1f}" if run.folds > 1 else ""
        lines.append(
            f"| {run.init} | {run.mode} | {run.split} | {run.mean * 100:.1f}%{spread} | "
            f"{run.folds} | {run.minutes:.1f} |"
        )
    kind = (
        "quick smoke run, not a result"
        if quick
        else f"LOSO folds train {LOSO_EPOCHS} epochs, official-split runs the recipe's"
    )
    lines.append(f"\nFSDD digits (10 classes, chance 10%); {kind}; {minutes:.1f} minutes in all.")
    return "\n".join(lines)


def plot_results(runs: list[Run], path: Path) -> Path:
    """Grouped bars: accuracy per split, one bar per init x mode, LOSO std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    combos = [(init, mode) for init in INITS for mode in MODES]
    width = 0.8 / len(combos)
    for i, (init, mode) in enumerate(combos):
        cells = [
            next(r for r in runs if (r.init, r.mode, r.split) == (init, mode, s)) for s in SPLITS
        ]
        xs = [j + (i - (len(combos) - 1) / 2) * width for j in range(len(SPLITS))]
        ax.bar(
            xs,
            [c.mean * 100 for c in cells],
            width,
            yerr=[c.std * 100 for c in cells],
            capsize=3,
            label=f"{init} {mode}",
        )
    ax.axhline(10, color="grey", linestyle=":", linewidth=1, label="chance")
    ax.set_xticks(range(len(SPLITS)), ["official split", "leave one speaker out"])
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title("FSDD digits: pretrained vs random-init SSAMBA encoder")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(main())
