"""Selective scan on CPU: the C++ kernel vs the pure-PyTorch chunked scan, forward + backward.

The workload is one direction of a mixer: B=4, D=384 channels, N=16 states, softplus,
z gate, D skip and delta_bias, gradients of every input. Tensors are laid out as in the
mixer: u, delta, z and the output's gradient are channels-last views of (B, L, D) tensors,
B and C views of (B, L, N). Target (issue, 2-core AVX-512 machine): forward + backward at L=2048 in
<= 40 ms with <= 100 MB of extra memory.

Every (implementation, length) runs in a fresh process. Time is the median wall time
(`median_seconds`) of the forward alone and of forward + backward (`torch.autograd.grad`,
so gradients are freed after each call). Memory is the peak resident set size during the
first forward + backward above what the process held just before it (inputs, the loaded
kernel and a small warm-up call are in that baseline): saved tensors, gradients, workspace
and allocator slack count; `tracemalloc` cannot see torch's allocations.
"""

from __future__ import annotations

from pathlib import Path

from ssamba.bench.report import in_fresh_process, median_seconds, peak_rss_bytes, rss_bytes

LENGTHS = [512, 2048, 8192]
QUICK_LENGTHS = [512, 2048]
BATCH, DIM, D_STATE = 4, 384, 16
TARGET_LENGTH, TARGET_MS, TARGET_MB = 2048, 40.0, 100.0


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per length: kernel and chunked time and memory, and their ratios."""
    rows = []
    for length in QUICK_LENGTHS if quick else LENGTHS:
        kernel = in_fresh_process(_measure, "cpp", length, 3 if quick else 7)
        # The chunked scan takes seconds per call at 8192 steps: fewer repeats.
        chunked = in_fresh_process(_measure, "chunked", length, 1 if quick else 3)
        row = {"batch": BATCH, "dim": DIM, "d_state": D_STATE, "length": length}
        row |= {f"kernel_{k}": v for k, v in kernel.items() if k != "threads"}
        row |= {f"chunked_{k}": v for k, v in chunked.items() if k != "threads"}
        row["speedup"] = chunked["fwd_bwd_ms"] / kernel["fwd_bwd_ms"]
        row["memory_ratio"] = chunked["extra_mb"] / max(kernel["extra_mb"], 1e-3)
        row["threads"] = kernel["threads"]
        row["target"] = _target(kernel) if length == TARGET_LENGTH else ""
        rows.append(row)
    return rows


def _target(kernel: dict) -> str:
    met = kernel["fwd_bwd_ms"] <= TARGET_MS and kernel["extra_mb"] <= TARGET_MB
    return f"<= {TARGET_MS:.0f} ms, <= {TARGET_MB:.0f} MB: {'met' if met else 'MISSED'}"


def _inputs(length: int, requires_grad: bool = True) -> list:
    """u, delta, A, B, C, D, z, delta_bias in the mixer's layout and value ranges."""
    import torch

    g = torch.Generator().manual_seed(0)

    def channels_last(rows: int) -> torch.Tensor:
        return torch.randn(BATCH, length, rows, generator=g).transpose(1, 2)

    tensors = [
        channels_last(DIM),  # u
        channels_last(DIM) - 1.0,  # delta, before bias and softplus
        -torch.arange(1.0, D_STATE + 1).repeat(DIM, 1),  # A: S4D-real init
        channels_last(D_STATE),  # B
        channels_last(D_STATE),  # C
        torch.ones(DIM),  # D
        channels_last(DIM),  # z
        torch.randn(DIM, generator=g) * 0.1 - 2.0,  # delta_bias: dt ~ 0.1
    ]
    return [t.requires_grad_(requires_grad) for t in tensors]


def _measure(impl: str, length: int, repeats: int) -> dict:
    """Time and peak extra memory of one implementation; runs in a child process."""
    import torch

    from ssamba.models.scan import IMPLEMENTATIONS, load_cpu_kernel

    scan = IMPLEMENTATIONS[impl]
    if impl == "cpp":
        load_cpu_kernel()
    warm = _inputs(64)
    torch.autograd.grad(scan(*warm, delta_softplus=True).sum(), warm)
    inputs = _inputs(length)
    grad_out = torch.randn(BATCH, length, DIM).transpose(1, 2)  # as out_proj's backward gives it

    def forward() -> torch.Tensor:
        return scan(*inputs, delta_softplus=True)

    def forward_backward() -> None:
        torch.autograd.grad(forward(), inputs, grad_out)

    baseline = rss_bytes()
    forward_backward()
    extra = peak_rss_bytes() - baseline
    return {
        "fwd_ms": 1000 * median_seconds(forward, repeats),
        "fwd_bwd_ms": 1000 * median_seconds(forward_backward, repeats),
        "extra_mb": extra / 2**20,
        "threads": torch.get_num_threads(),
    }
