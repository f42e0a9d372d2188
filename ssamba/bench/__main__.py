"""`ssamba bench <name>` (or `python -m ssamba.bench <name>`): runs `ssamba.bench.<name>.run`."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from ssamba.bench.report import print_table, write_csv

BENCHMARKS = {
    "scan": "selective scan: C++ kernel vs pure-PyTorch chunked scan (fwd+bwd time, memory)",
    "mixer": "mixers: bidirectional Mamba vs attention, forward+backward vs tokens",
    "data": "decode + fbank throughput per worker on 10 s clips",
    "train": "pretraining steps/s, ssamba-tiny vs ssast-tiny at 512 tokens",
    "fta": "factorized time/frequency attention vs full attention: FLOPs and time vs grid",
    "export": "exported program and onnxruntime vs eager at 10 s and 10 min, export time and "
    "memory (4 x 64 encoder; SSAMBA-tiny too without --quick)",
    "efficiency": "tiny ssamba/aum/ssast (sdpa, naive, fta): time + peak memory vs tokens "
    "512..32k, inference and training; CSV, markdown, plot (over an hour: not in `all`)",
}
# Run only by name: `all` would otherwise take hours on a CPU.
NOT_IN_ALL = {"efficiency", "export"}


PROG = "ssamba bench"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run speed/memory benchmarks; print a table and write CSV.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="benchmarks:\n" + "\n".join(f"  {k:6s} {v}" for k, v in BENCHMARKS.items()),
    )
    parser.add_argument("name", choices=[*BENCHMARKS, "all"])
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="CSV folder")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, fewer repeats")
    args = parser.parse_args(argv)
    names = [n for n in BENCHMARKS if n not in NOT_IN_ALL] if args.name == "all" else [args.name]
    for name in names:
        module = importlib.import_module(f"ssamba.bench.{name}")
        print(f"== {name}: {BENCHMARKS[name]}")
        rows = module.run(args.out, args.quick)
        print_table(rows)
        path = write_csv(rows, args.out / f"{name}.csv")
        print(f"-> {path}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
