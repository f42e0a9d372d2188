"""`make demo`: does pretraining pay off? FSDD on a laptop CPU, at several label budgets.

    python -m ssamba.demo --fsdd ../shared/data/fsdd --work work/demo [--quick]

1. shard FSDD (3,000 spoken digits, 6 speakers) into WebDataset tars   `ssamba shard`
2. pretrain a small SSAMBA (ssamba-tiny's design, 4 layers x 64) on    `ssamba pretrain`
   the training split's audio, labels unused (PRETRAIN_RECIPE)
3. `ssamba label-efficiency` with that encoder, on the official split  `ssamba label-efficiency`
   and leave-one-speaker-out: linear probes and fine-tunes of the
   pretrained encoder and of the same encoder from random init, at
   1, 5, 20 and all labels per class
4. print both tables (mean ± std over seeds or folds, pretrained minus random), and say
   where results.md / results.json / results.png and the logs are.

Every stage runs the real command line in a subprocess, so what the demo does is what a
user types (each command is printed) and its progress shows as it runs. FSDD is read
from `--fsdd`, else `$SSAMBA_FSDD`, else cloned from GitHub into the work folder (the
demo's only network use). `--quick` trains far less, on 2 LOSO folds and one seed: a
smoke test of the pipeline, not a result.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
PRETRAIN_RECIPE = REPO / "recipes" / "pretrain" / "fsdd_tiny_cpu.yaml"
SPLITS = {"official": [], "loso": ["--loso", "speaker"]}  # split -> label-efficiency options


class DemoError(RuntimeError):
    """A stage that cannot run or failed; the message says which and what to do."""


@dataclass(frozen=True)
class Budget:
    """How much each stage trains, as command-line options."""

    pretrain: tuple[str, ...]
    official: tuple[str, ...]
    loso: tuple[str, ...]


# Measured on a 2-core CPU shared with other jobs (load ~10): a 60-step fine-tune took
# ~50 s, probes of 4 encoders ~1.5 min, LOSO with fine-tunes at 5 labels/class 16 min.
# Fine-tuning with every label (3 epochs, 228 steps) runs on the official split only.
FULL = Budget(
    pretrain=(),
    official=(
        "--labels-per-class=1,5,20,all",
        "--finetune-labels-per-class=5,all",
        "--finetune-epochs=3",
        "--seeds=0,1,2",
    ),
    # six folds (one per speaker) x 3 seeds: 5.6 minutes on a quiet 2-core CPU
    loso=("--labels-per-class=1,5,20,all", "--finetune-labels-per-class=5", "--seeds=0,1,2"),
)
QUICK = Budget(
    pretrain=("--trainer.max_steps=30", "--trainer.val_check_interval=30"),
    official=(
        "--labels-per-class=5,all",
        "--finetune-labels-per-class=5",
        "--seeds=0",
        "--finetune-min-steps=5",
    ),
    loso=(
        "--labels-per-class=5",
        "--seeds=0",
        "--folds=george,theo",
        "--finetune-min-steps=5",
        "--finetune-epochs=1",
    ),
)


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
        outputs = [label_efficiency(encoder, shards, work, split, budget) for split in SPLITS]
    except DemoError as err:
        print(f"\nssamba demo: {err}", file=sys.stderr)
        return 1
    report(outputs, work, (time.monotonic() - started) / 60, args.quick)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ssamba.demo",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fsdd", type=Path, help="FSDD folder (with recordings/)")
    parser.add_argument("--work", type=Path, default=Path("work/demo"), help="output folder")
    parser.add_argument("--quick", action="store_true", help="minutes, not an hour")
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
        f"2/3 pretrain SSAMBA ({PRETRAIN_RECIPE.stem} recipe)",
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


def label_efficiency(encoder: Path, shards: Path, work: Path, split: str, budget: Budget) -> Path:
    """`ssamba label-efficiency` on one split with the demo's encoder; returns its folder."""
    out = work / "label-efficiency" / split
    shutil.rmtree(out, ignore_errors=True)
    options = [
        f"--shards={shards}",
        f"--encoder={encoder}",
        f"--out={out}",
        *SPLITS[split],
        *(budget.official if split == "official" else budget.loso),
    ]
    run_stage(f"3/3 label efficiency, {split} split", ["label-efficiency"], options)
    if not (out / "results.md").is_file():
        raise DemoError(f"{out / 'results.md'}: missing; label-efficiency should have written it")
    return out


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


# ---------------------------------------------------------------------------- report
def report(outputs: list[Path], work: Path, minutes: float, quick: bool) -> None:
    """Print both tables and say where the results, plots and logs are."""
    kind = "quick smoke run, not a result" if quick else "the demo's budget"
    print(f"\n=== FSDD digits (10 classes, chance 10%); {kind}; {minutes:.1f} minutes in all")
    for out in outputs:
        print(f"\n{out.name} split ({out}):\n" + (out / "results.md").read_text())
        print(f"plot:        {out / 'results.png'}")
    print(f"logs:        tensorboard --logdir {work}   (pretraining curves and reconstructions)")


if __name__ == "__main__":
    sys.exit(main())
