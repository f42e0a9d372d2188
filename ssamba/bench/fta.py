"""Factorized time/frequency attention (FTA) vs full attention, as the patch grid grows.

Forward + backward of one attention mixer (width 192, 3 heads, batch 4, SSAST's cls +
dist prefix) on grids of 8 frequency rows (128 mel bins in 16x16 patches) and a growing
number of time columns: full attention with SDPA, full attention computed naively (the
(tokens x tokens) matrix, as the original SSAST), and FTA (`attention: fta`, SDPA inside
each row and column). Full attention's cost grows with tokens^2 = (8 T)^2, FTA's with
8 T (8 + T). GFLOP of the attention products (counted, `attention_gflop`) and the
median wall time of `repeats` steps after one warm-up, in this process.

    python -m ssamba.bench fta --quick      (run(out_dir, quick) -> rows, as the others)
"""

from __future__ import annotations

import time
from pathlib import Path

DIM, HEADS, BATCH, ROWS, PREFIX = 192, 3, 4, 8, 2
COLUMNS = [16, 32, 64, 128, 256]
QUICK_COLUMNS = [8, 16, 32, 64]
IMPLS = ("sdpa", "naive", "fta")


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per (attention, grid); `quick`: smaller grids, 3 repeats."""
    repeats = 3 if quick else 5
    return [
        measure(impl, (ROWS, columns), repeats)
        for columns in (QUICK_COLUMNS if quick else COLUMNS)
        for impl in IMPLS
    ]


def measure(impl: str, grid: tuple[int, int], repeats: int = 3, batch: int = BATCH) -> dict:
    """forward + backward time of one attention mixer over a (freq, time) patch grid."""
    import torch

    from ssamba.models.transformer import Attention

    attention = Attention(DIM, HEADS, impl=impl)
    tokens = PREFIX + grid[0] * grid[1]
    x = torch.randn(batch, tokens, DIM, requires_grad=True)
    layout = (grid, PREFIX, 0)

    def step() -> None:
        out = attention(x, layout) if impl == "fta" else attention(x)
        out.sum().backward()

    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "attention": impl,
        "grid": f"{grid[0]}x{grid[1]}",
        "tokens": tokens,
        "batch": batch,
        "ms": 1000 * times[len(times) // 2],
        "gflop": attention_gflop(impl, grid, batch),
        "threads": torch.get_num_threads(),
    }


def attention_gflop(impl: str, grid: tuple[int, int], batch: int = BATCH) -> float:
    """FLOPs of the attention products alone (q k^T and weights v, forward), counted by
    torch's FlopCounterMode on the naive formulation of `impl` (CPU SDPA kernels are not
    counted by it): full attention for sdpa/naive, row + column attention for fta."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ssamba.models.transformer import _attend, factorized_attention

    q = torch.randn(batch, HEADS, PREFIX + grid[0] * grid[1], DIM // HEADS)
    with FlopCounterMode(display=False) as counter:
        if impl == "fta":
            factorized_attention(q, q, q, grid, PREFIX, 0, inner="naive")
        else:
            _attend(q, q, q, "naive")
    return counter.get_total_flops() / 1e9
