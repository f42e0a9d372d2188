"""`make demo`: does pretraining pay off? FSDD on a laptop CPU, at several label budgets.

    python -m ssamba.demo --fsdd path/to/fsdd --work work/demo [--quick]

1. shard FSDD (3,000 spoken digits, 6 speakers) into WebDataset tars   `ssamba shard`
2. `ssamba label-efficiency --loso speaker`: two held-out speakers      `ssamba label-efficiency`
   (theo, yweweler) that no training hears; a small SSAMBA (ssamba-
   tiny's design, 4 layers x 64, PRETRAIN_RECIPE) is pretrained on the
   other four speakers' audio, labels unused; then linear probes and
   fine-tunes of it and of the same encoder from random init, and the
   hand-crafted baseline (a probe on filterbank statistics), at 1, 5,
   20 and all labels per class of the four speakers, each tested on
   one held-out speaker
3. print the table (mean ± std over seeds and folds, pretrained minus random), and say
   where results.md / results.json / results.png and the logs are.

One pretraining only, so the demo fits 30 minutes on a laptop CPU; the official split
would need a second encoder (this one heard the official test takes of its four
speakers). Every stage runs the real command line in a subprocess, so what the demo does
is what a user types (each command is printed) and its progress shows as it runs. FSDD
is read from `--fsdd`, else `$SSAMBA_FSDD`, else cloned from GitHub into the work folder
(the demo's only network use). `--quick` trains far less, on one seed: a smoke test of
the pipeline, not a result.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ssamba.recipe_paths import RECIPES

REPO = Path(__file__).resolve().parents[1]
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
PRETRAIN_RECIPE = RECIPES / "pretrain" / "fsdd_tiny_cpu.yaml"
PROTOCOL = ("--loso", "speaker", "--heldout", "theo,yweweler")


class DemoError(RuntimeError):
    """A stage that cannot run or failed; the message says which and what to do."""


# Label-efficiency options of each budget (pretraining included). The full budget: one
# pretraining on four speakers (the recipe's 6,000 steps), then 2 held-out folds x 3 seeds.
FULL = (
    f"--pretrain-recipe={PRETRAIN_RECIPE}",
    "--labels-per-class=1,5,20,all",
    "--finetune-labels-per-class=5,all",
    "--finetune-epochs=3",
    "--seeds=0,1,2",
)
QUICK = (
    f"--pretrain-recipe={PRETRAIN_RECIPE}",
    "--pretrain-args=--trainer.max_steps=30 --trainer.val_check_interval=30",
    "--labels-per-class=5,all",
    "--finetune-labels-per-class=5",
    "--seeds=0",
    "--finetune-min-steps=5",
    "--finetune-epochs=1",
)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    work: Path = args.work.resolve()
    started = time.monotonic()
    try:
        fsdd = locate_fsdd(args.fsdd, work)
        shards = work / "shards" / "fsdd"
        run_stage(
            "1/2 shard FSDD",
            ["shard", "--corpus", "fsdd", "--src", str(fsdd), "--out", str(shards)],
            ["--workers", "2"],
        )
        results = label_efficiency(shards, work, QUICK if args.quick else FULL)
    except DemoError as err:
        print(f"\nssamba demo: {err}", file=sys.stderr)
        return 1
    report(results, work, (time.monotonic() - started) / 60, args.quick)
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


def label_efficiency(shards: Path, work: Path, budget: tuple[str, ...]) -> Path:
    """`ssamba label-efficiency` with pretraining, held-out speakers; its results folder."""
    out = work / "label-efficiency"
    shutil.rmtree(out, ignore_errors=True)  # so this run's folder is run-1
    options = [f"--shards={shards}", f"--out={out}", *PROTOCOL, *budget]
    run_stage(
        "2/2 pretrain, then label efficiency on held-out speakers", ["label-efficiency"], options
    )
    results = out / "run-1"
    if not (results / "results.md").is_file():
        raise DemoError(
            f"{results / 'results.md'}: missing; label-efficiency should have written it"
        )
    return results


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
def report(results: Path, work: Path, minutes: float, quick: bool) -> None:
    """Print the table and say where the results, plot and logs are."""
    kind = "quick smoke run, not a result" if quick else "the demo's budget"
    print(f"\n=== FSDD digits (10 classes, chance 10%); {kind}; {minutes:.1f} minutes in all")
    print(f"\nheld-out speakers ({results}):\n" + (results / "results.md").read_text())
    print(f"plot:        {results / 'results.png'}")
    print(f"logs:        tensorboard --logdir {results / 'pretrain'}   (pretraining curves)")


if __name__ == "__main__":
    sys.exit(main())
