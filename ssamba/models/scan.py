"""Selective scan (the S6 recurrence of Mamba-1): one contract, four implementations.

    delta' = softplus(delta + delta_bias) if delta_softplus else delta + delta_bias
    h_t    = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t        h: (batch, dim, d_state)
    y_t    = <C_t, h_t> + D * u_t
    out    = y * silu(z)                                                (if z is given)

Arguments follow mamba-ssm's `selective_scan_fn` exactly, so the Mamba mixer can call
either: u, delta, z: (batch, dim, length); A: (dim, d_state); B, C: (batch, d_state, length);
D, delta_bias: (dim,). `reverse=True` runs time from L-1 down to 0 (the backward direction
of the bidirectional mixer) without the caller materialising flips.

Implementations, all with the same signature:
- `selective_scan_ref`: a plain loop over time; slow, obviously correct: the test oracle.
- `selective_scan_chunked`: pure PyTorch, vectorised over 64-step chunks, checkpointed;
  the fallback when no C++ compiler is available and the benchmark comparator.
- `selective_scan_cpp`: our C++ CPU kernel (`csrc/selective_scan.cpp`) with a hand-written
  backward; built on first use, together with the mixer's conv kernel (`load_cpu_kernel`).
- `selective_scan_cuda`: mamba-ssm's fused CUDA kernel (reverse via flips).

`selective_scan_fn` dispatches: CUDA tensors -> mamba-ssm if its Mamba-1 CUDA scan
imports (`CUDA_KERNELS`, checked once at import, with one warning on a GPU machine where
it is missing); CPU -> the C++ kernel, or the chunked scan with one warning if the kernel
cannot be built. The environment variable `SSAMBA_SCAN=ref|chunked|cpp|auto` forces one
implementation (read when torch.compile traces, so set it before compiling).

The C++ scan is registered as the torch.library ops `ssamba::selective_scan` and
`ssamba::selective_scan_backward` with fake implementations, so it runs inside
`torch.compile(fullgraph=True)` graphs and `torch.export` programs.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import importlib.util
import logging
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

ScanResult = Tensor | tuple[Tensor, Tensor]

# Steps between the states the C++ forward keeps for its backward, and the chunk of the
# pure-PyTorch scan; 32-128 measured within 5% of each other.
CHUNK = 64
# Steps the pure-PyTorch scan checkpoints as one piece: its backward holds one segment's
# graph at a time instead of the whole sequence's (peak RSS at batch 4, dim 384, 2048 steps:
# 1.3 GB instead of 3.1 GB; what remains grows with length is mostly glibc heap slack).
SEGMENT = 4 * CHUNK
_CSRC = Path(__file__).with_name("csrc")
_ENV = "SSAMBA_SCAN"
_CHOICES = ("auto", "ref", "chunked", "cpp", "cuda")


# --------------------------------------------------------------------------- validation
def _check_tensor(name: str, x: Tensor | None, shape: dict[str, int], device: torch.device) -> None:
    """Raise a ValueError naming `name` and the expected shape, e.g. 'B: expected (batch=2, ...)'."""
    if x is None:
        return
    expected = ", ".join(f"{k}={v}" for k, v in shape.items())
    if not isinstance(x, Tensor):
        raise ValueError(f"{name}: expected a tensor of shape ({expected}), got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape.values()):
        raise ValueError(f"{name}: expected ({expected}), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name}: expected a floating-point tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device} (the device of u), got {x.device}")


def _validate(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
) -> None:
    if not isinstance(u, Tensor) or u.dim() != 3:
        got = tuple(u.shape) if isinstance(u, Tensor) else type(u).__name__
        raise ValueError(f"u: expected (batch, dim, length), got {got}")
    if not isinstance(A, Tensor) or A.dim() != 2:
        got = tuple(A.shape) if isinstance(A, Tensor) else type(A).__name__
        raise ValueError(f"A: expected (dim, d_state), got {got}")
    if A.is_complex():
        raise ValueError("A: complex A is not supported; expected a real (dim, d_state) tensor")
    batch, dim, length = u.shape
    d_state = A.shape[1]
    sequence = {"batch": batch, "dim": dim, "length": length}
    states = {"batch": batch, "d_state": d_state, "length": length}
    _check_tensor("u", u, sequence, u.device)
    _check_tensor("delta", delta, sequence, u.device)
    _check_tensor("A", A, {"dim": dim, "d_state": d_state}, u.device)
    _check_tensor("B", B, states, u.device)
    _check_tensor("C", C, states, u.device)
    _check_tensor("D", D, {"dim": dim}, u.device)
    _check_tensor("z", z, sequence, u.device)
    _check_tensor("delta_bias", delta_bias, {"dim": dim}, u.device)


# --------------------------------------------------------------------------- shared pieces
def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """float64 if anything is float64, else float32: half precision is computed in float32."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _cast(x: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return None if x is None else x.to(dtype)


def _effective_delta(delta: Tensor, delta_bias: Tensor | None, softplus: bool) -> Tensor:
    """delta': (batch, dim, length), the step size the recurrence actually uses."""
    if delta_bias is not None:
        delta = delta + delta_bias[:, None]
    return F.softplus(delta) if softplus else delta


def _skip_and_gate(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None) -> Tensor:
    """out = (y + D * u) * silu(z); all (batch, dim, length)."""
    if D is not None:
        y = y + D[:, None] * u
    return y * F.silu(z) if z is not None else y


def _flip_time(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.flip(-1)


def forward_only(impl: Callable[..., ScanResult]) -> Callable[..., ScanResult]:
    """Complete an implementation that only scans forward to the full contract: validate
    the inputs, and run `reverse=True` as flip(scan(flip(inputs))), the definition every
    native reverse mode (the C++ kernel's) must match."""

    @functools.wraps(impl)
    def scan(
        u: Tensor,
        delta: Tensor,
        A: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor | None = None,
        z: Tensor | None = None,
        delta_bias: Tensor | None = None,
        delta_softplus: bool = False,
        return_last_state: bool = False,
        reverse: bool = False,
    ) -> ScanResult:
        _validate(u, delta, A, B, C, D, z, delta_bias)
        if not reverse:
            return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
        flipped = (u.flip(-1), delta.flip(-1), A, B.flip(-1), C.flip(-1), D, _flip_time(z))
        result = impl(*flipped, delta_bias, delta_softplus, return_last_state)
        if return_last_state:
            return result[0].flip(-1), result[1]
        return result.flip(-1)

    return scan


# --------------------------------------------------------------------------- reference loop
@forward_only
def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """The recurrence written step by step: the oracle every other implementation must match.

    Autograd differentiates it (including through `last_state`); time and memory are
    O(length) Python steps, so keep it to tests and short sequences.
    """
    out_dtype = u.dtype
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = (
        _cast(t, dtype) for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    delta = _effective_delta(delta, delta_bias, delta_softplus)
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        decay = torch.exp(delta[:, :, t, None] * A)  # (batch, dim, d_state)
        h = decay * h + (delta[:, :, t] * u[:, :, t])[..., None] * B[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, C[:, :, t]))
    y = torch.stack(ys, dim=-1) if ys else u.new_zeros(u.shape)
    out = _skip_and_gate(y, u, D, z).to(out_dtype)
    return (out, h.to(out_dtype)) if return_last_state else out


# --------------------------------------------------------------------------- chunked PyTorch
def _chunked_states(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor, initial: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """y: (batch, dim, length) without skip/gate, and the last state: (batch, dim, d_state).

    Inputs are padded to a multiple of `chunk`; `initial` is the state before the first
    step. Each chunk runs the exact recurrence from a zero state, all chunks at once
    (`chunk` vectorised steps instead of `length`); then the true state entering each
    chunk is propagated across chunks and its contribution, decayed by
    exp(A * cumsum(delta)) <= 1, is added. No exp(-cumsum) appears anywhere, so nothing
    overflows where the recurrence itself does not.
    """
    batch, dim, length = u.shape
    n_chunks = length // chunk
    d_state = A.shape[1]
    dt = delta.view(batch, dim, n_chunks, chunk)
    dtu = (delta * u).view(batch, dim, n_chunks, chunk)
    # (batch, n_chunks, chunk, d_state): per-step B/C rows, broadcast over dim below.
    B_steps = B.view(batch, d_state, n_chunks, chunk).permute(0, 2, 3, 1)
    C_steps = C.view(batch, d_state, n_chunks, chunk).permute(0, 2, 3, 1)
    h = u.new_zeros(batch, dim, n_chunks, d_state)
    ys = []
    for s in range(chunk):
        decay = torch.exp(dt[..., s, None] * A[:, None, :])
        h = decay * h + dtu[..., s, None] * B_steps[:, None, :, s]
        ys.append((h * C_steps[:, None, :, s]).sum(-1))
    y_local = torch.stack(ys, dim=-1)  # (batch, dim, n_chunks, chunk)

    decay_in_chunk = torch.exp(dt.cumsum(-1)[..., None] * A[:, None, None, :])
    state = initial
    entering = []
    for c in range(n_chunks):
        entering.append(state)
        state = decay_in_chunk[:, :, c, -1] * state + h[:, :, c]
    carried = torch.einsum(
        "bdctn,bctn,bdcn->bdct", decay_in_chunk, C_steps, torch.stack(entering, dim=2)
    )
    return (y_local + carried).reshape(batch, dim, length), state


@forward_only
def selective_scan_chunked(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """Pure-PyTorch scan, vectorised over chunks, checkpointed per SEGMENT steps.

    Runs on any device; on CPU one to two orders of magnitude slower and hungrier than the
    C++ kernel (`python -m ssamba.bench scan`).
    """
    out_dtype, length = u.dtype, u.shape[-1]
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    u, delta, A, B, C, D, z, delta_bias = (
        _cast(t, dtype) for t in (u, delta, A, B, C, D, z, delta_bias)
    )
    dt = _effective_delta(delta, delta_bias, delta_softplus)
    # Zero padding is inert: delta' = 0 means decay 1 and no input, so the state is kept.
    pad = (-length) % CHUNK
    u_pad, dt_pad, B_pad, C_pad = (F.pad(t, (0, pad)) for t in (u, dt, B, C))
    last = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for start in range(0, length + pad, SEGMENT):
        piece = slice(start, start + SEGMENT)
        args = (u_pad[..., piece], dt_pad[..., piece], A, B_pad[..., piece], C_pad[..., piece])
        if torch.is_grad_enabled():
            y, last = checkpoint(_chunked_states, *args, last, CHUNK, use_reentrant=False)
        else:
            y, last = _chunked_states(*args, last, CHUNK)
        ys.append(y)
    y = torch.cat(ys, dim=-1) if ys else u.new_zeros(u.shape)
    out = _skip_and_gate(y[..., :length], u, D, z).to(out_dtype)
    return (out, last.to(out_dtype)) if return_last_state else out


# --------------------------------------------------------------------------- C++ CPU kernel
_build_lock = threading.Lock()
_kernel = None
_kernel_error: str | None = None


def _cpu_fingerprint() -> str:
    """Short hash of the CPU's feature flags: a build with -march=native must not be
    reused on a machine that lacks its instructions (the flags enter torch's build hash)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:12]


_KERNEL_NAME = "ssamba_cpu_kernels"


def _no_cuda_home_notice(record: logging.LogRecord) -> bool:
    """torch.utils.cpp_extension logs "No CUDA runtime is found, using CUDA_HOME=..." on
    every CPU run; these kernels are CPU-only and never use it."""
    return not record.getMessage().startswith("No CUDA runtime is found")


_KERNEL_SOURCES = ("module.cpp", "selective_scan.cpp", "causal_conv1d.cpp")


def _kernel_flags() -> list[str]:
    return ["-O3", "-march=native", "-fopenmp", f"-DSSAMBA_CPU={_cpu_fingerprint()}"]


def kernel_build_folder(flags: list[str], root: Path | None = None) -> Path:
    """Where this checkout's kernels are built: `<root>/ssamba_cpu_kernels-<hash>`.

    The hash covers every file of csrc/ and where it lies, the flags (the CPU's feature
    flags among them), torch's and Python's versions, so two checkouts or versions on one
    machine never rebuild, or load, each other's build (torch's own folder is one per
    name, shared by all). The place counts too: torch's build file names the sources by
    path, so two checkouts of the same sources sharing a folder would rebuild it each
    time they took turns. root: `$TORCH_EXTENSIONS_DIR`, else `$XDG_CACHE_HOME/ssamba`
    (~/.cache/ssamba).
    """
    if root is None:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or Path(cache) / "ssamba")
    digest = hashlib.sha256(str(_CSRC.resolve()).encode() + b"\0")
    for source in sorted(_CSRC.iterdir()):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    digest.update("\0".join([*flags, torch.__version__, python]).encode())
    return Path(root) / f"{_KERNEL_NAME}-{digest.hexdigest()[:16]}"


@contextlib.contextmanager
def _build_lock_file(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<folder>.lock` (fcntl): a second process that needs the
    same build waits here until the first has finished it, then loads it. The OS drops
    the lock when its holder dies, so a killed build never blocks the next one."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.with_name(folder.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _build_and_load(cpp_extension: Any, folder: Path, flags: list[str]) -> Any:
    """Under the lock: one line on stderr when the kernels are built here (a build takes a
    minute or more, silently), then torch's build-or-load."""
    with _build_lock_file(folder):
        if not (folder / f"{_KERNEL_NAME}.so").is_file():
            print(f"ssamba: building the C++ CPU kernels in {folder}", file=sys.stderr, flush=True)
            folder.mkdir(parents=True, exist_ok=True)
        # torch's own lock file, left behind by a build that was killed (also a rebuild
        # over an existing .so: every fresh process goes through torch's lock), would make
        # torch wait forever; under our lock no other process is in torch's load here.
        (folder / "lock").unlink(missing_ok=True)
        return cpp_extension.load(
            name=_KERNEL_NAME,
            sources=[str(_CSRC / name) for name in _KERNEL_SOURCES],
            extra_include_paths=[str(_CSRC)],
            extra_cflags=flags,
            extra_ldflags=["-fopenmp"],
            build_directory=str(folder),
            verbose=False,
        )


def load_cpu_kernel():
    """Build (first time, ~60 s) or load (cached, ~0.05 s) the C++ kernels; once per process.

    One module holds the selective scan (`scan_forward`/`scan_backward`) and the mixer's
    depthwise causal conv1d + silu (`conv_forward`/`conv_backward`, used by
    `ssamba.models.mamba`). The build lives in `kernel_build_folder`. Raises RuntimeError
    with the compiler's complaint if it cannot be built.
    """
    global _kernel, _kernel_error
    with _build_lock:
        if _kernel is None and _kernel_error is None:
            logging.getLogger("torch.utils.cpp_extension").addFilter(_no_cuda_home_notice)
            from torch.utils import cpp_extension

            flags = _kernel_flags()
            try:
                _kernel = _build_and_load(cpp_extension, kernel_build_folder(flags), flags)
            except Exception as err:  # compiler missing, headers missing, build error
                _kernel_error = f"{type(err).__name__}: {err}"
        if _kernel is None:
            raise RuntimeError(f"the C++ selective-scan kernel could not be built: {_kernel_error}")
        return _kernel


# The kernel as torch.library ops, so it also runs inside torch.compile'd graphs and
# torch.export'ed programs; the fake (meta) implementations give the real outputs' strides.
@torch.library.custom_op("ssamba::selective_scan", mutates_args=())
def _scan_op(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    reverse: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """out (u's strides), last_state (batch, dim, d_state) and the state entering every
    CHUNK-step chunk (batch, chunks, d_state, dim), which the backward restarts from."""
    out, last_state, chunk_states = load_cpu_kernel().scan_forward(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse, CHUNK, 1.0, None, False, None,
        None, True,
    )  # fmt: skip
    return out, last_state, chunk_states


@_scan_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, reverse):
    batch, dim, length = u.shape
    d_state = A.shape[1]
    chunks = max(1, -(-length // CHUNK))
    last_state = u.new_empty(batch, d_state, dim).transpose(1, 2)
    return torch.empty_like(u), last_state, u.new_empty(batch, chunks, d_state, dim)


@torch.library.custom_op("ssamba::selective_scan_backward", mutates_args=())
def _scan_backward_op(
    dout: Tensor,
    dlast_state: Tensor | None,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    chunk_states: Tensor,
    delta_softplus: bool,
    reverse: bool,
) -> list[Tensor]:
    """du, ddelta, dA, dB, dC, dD, dz, ddelta_bias; an empty tensor for an absent input."""
    grads = load_cpu_kernel().scan_backward(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states,
        delta_softplus, reverse, CHUNK, 1.0, None, None, None, None, False, False, None,
    )  # fmt: skip
    return [u.new_empty(0) if g is None else g for g in grads[:8]]


@_scan_backward_op.register_fake
def _(dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, *options):
    def like(t: Tensor | None) -> Tensor:
        return u.new_empty(0) if t is None else torch.empty_like(t)

    def states_last(t: Tensor) -> Tensor:  # (batch, d_state, length) over (batch, length, d_state)
        return t.new_empty(t.shape[0], t.shape[2], t.shape[1]).transpose(1, 2)

    return [
        torch.empty_like(u),
        torch.empty_like(delta),
        A.new_empty(A.shape),
        states_last(B),
        states_last(C),
        like(D),
        like(z),
        like(delta_bias),
    ]


def _scan_setup_context(ctx, inputs, output):
    *tensors, delta_softplus, reverse = inputs
    ctx.save_for_backward(*tensors, output[2])
    ctx.options = (delta_softplus, reverse)
    # An unused last_state (the usual case) then reaches backward as None, not zeros.
    ctx.set_materialize_grads(False)


def _scan_backward(ctx, dout, dlast_state, _dchunk_states):
    u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
    if dout is None:
        dout = torch.zeros_like(u)
    grads = _scan_backward_op(
        dout, dlast_state, u, delta, A, B, C, D, z, delta_bias, chunk_states, *ctx.options
    )
    given = (u, delta, A, B, C, D, z, delta_bias)
    return *(g if t is not None else None for g, t in zip(grads, given, strict=True)), None, None


_scan_op.register_autograd(_scan_backward, setup_context=_scan_setup_context)


def selective_scan_cpp(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
) -> ScanResult:
    """The C++ CPU kernel; reads strided inputs (e.g. channels-last views) without copies.

    Half-precision inputs are computed in float32 and the result cast back.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias)
    if u.device.type != "cpu":
        raise ValueError(f"u: the C++ scan runs on CPU tensors, got {u.device}")
    out_dtype = u.dtype
    dtype = _compute_dtype(u, delta, A, B, C, D, z, delta_bias)
    # Per-channel parameters are tiny: contiguous copies cost nothing and simplify the kernel.
    A, D, delta_bias = (None if t is None else t.to(dtype).contiguous() for t in (A, D, delta_bias))
    u, delta, B, C, z = (_cast(t, dtype) for t in (u, delta, B, C, z))
    out, last_state, _ = _scan_op(
        u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), bool(reverse)
    )
    out, last_state = out.to(out_dtype), last_state.to(out_dtype)
    return (out, last_state) if return_last_state else out


# --------------------------------------------------------------------------- CUDA (mamba-ssm)
class CudaKernels(NamedTuple):
    """mamba-ssm's Mamba-1 CUDA kernels and causal-conv1d's, each None where not usable."""

    selective_scan_fn: Callable | None  # mamba-ssm's selective scan (selective_scan_cuda)
    mamba_inner_fn: Callable | None  # its fused conv + scan + out_proj; needs causal-conv1d too
    causal_conv1d_fn: Callable | None
    problems: tuple[str, ...]  # why any of them is missing


def _find_cuda_kernels() -> CudaKernels:
    """Import the optional CUDA packages (`pip install 'ssamba[cuda]'`) and check that they
    hold the compiled kernels: mamba-ssm wheels built without MAMBA_KEEP_CUDA_BUILD lack the
    Mamba-1 scan, and a wheel built for another torch fails to import."""
    scan = inner = conv = None
    problems = []
    if importlib.util.find_spec("causal_conv1d") is None:
        problems.append("causal-conv1d is not installed")
    else:
        try:
            from causal_conv1d import causal_conv1d_fn as conv
        except Exception as err:  # ImportError, or OSError/undefined symbols from a bad build
            problems.append(f"causal-conv1d does not import ({type(err).__name__}: {err})")
    if importlib.util.find_spec("mamba_ssm") is None:
        problems.append("mamba-ssm is not installed")
    else:
        try:
            from mamba_ssm.ops import selective_scan_interface as mamba_ops
        except Exception as err:
            problems.append(f"mamba-ssm does not import ({type(err).__name__}: {err})")
        else:
            if getattr(mamba_ops, "selective_scan_cuda", None) is None:
                problems.append(
                    "mamba-ssm lacks its Mamba-1 CUDA scan (reinstall with "
                    "MAMBA_KEEP_CUDA_BUILD=TRUE pip install mamba-ssm --no-build-isolation)"
                )
            else:
                scan = mamba_ops.selective_scan_fn
                if getattr(mamba_ops, "causal_conv1d_fwd_function", conv) is not None:
                    inner = mamba_ops.mamba_inner_fn
    return CudaKernels(scan, inner, conv, tuple(problems))


def _warn_about_cuda_kernels(kernels: CudaKernels) -> None:
    """One warning at import where a GPU is present (or the packages are, but broken)."""
    installed = any(importlib.util.find_spec(m) for m in ("mamba_ssm", "causal_conv1d"))
    if kernels.problems and (installed or torch.cuda.is_available()):
        fallback = []
        if kernels.selective_scan_fn is None:
            fallback.append("the pure-PyTorch chunked scan (~50x slower)")
        if kernels.causal_conv1d_fn is None:
            fallback.append("PyTorch's conv1d")
        warnings.warn(
            f"ssamba on CUDA: {'; '.join(kernels.problems)}. The Mamba mixer runs on CUDA "
            f"with {' and '.join(fallback) or 'the unfused path'} instead "
            "(pip install 'ssamba[cuda]').",
            RuntimeWarning,
            stacklevel=2,
        )


CUDA_KERNELS = _find_cuda_kernels()
_warn_about_cuda_kernels(CUDA_KERNELS)


def mamba_ssm_available() -> bool:
    """True if mamba-ssm's Mamba-1 CUDA scan imports."""
    return CUDA_KERNELS.selective_scan_fn is not None


@forward_only
def selective_scan_cuda(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> ScanResult:
    """mamba-ssm's fused CUDA kernel; it has no reverse mode (`forward_only` adds it)."""
    if CUDA_KERNELS.selective_scan_fn is None:
        raise RuntimeError(f"selective scan on CUDA: {'; '.join(CUDA_KERNELS.problems)}")
    return CUDA_KERNELS.selective_scan_fn(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
    )


# --------------------------------------------------------------------------- dispatch
IMPLEMENTATIONS: dict[str, Callable[..., ScanResult]] = {
    "ref": selective_scan_ref,
    "chunked": selective_scan_chunked,
    "cpp": selective_scan_cpp,
    "cuda": selective_scan_cuda,
}
_warned_fallback = False


def _warn_fallback_once(reason: str) -> None:
    global _warned_fallback
    if not _warned_fallback:
        _warned_fallback = True
        warnings.warn(
            f"selective scan: {reason}; using the pure-PyTorch chunked scan (~50x slower)",
            RuntimeWarning,
            stacklevel=4,
        )


# torch.compile/export evaluate it once while tracing (building the kernel takes a lock)
# and use the answer as a constant: set SSAMBA_SCAN before compiling.
@torch.compiler.assume_constant_result
def resolve_implementation(device: torch.device) -> str:
    """Name of the implementation `selective_scan_fn` uses for tensors on `device`."""
    choice = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if choice not in _CHOICES:
        raise ValueError(f"{_ENV}={choice!r}: expected one of {', '.join(_CHOICES)}")
    if choice != "auto":
        return choice
    if device.type == "cuda":  # the fallback was announced at import (`CUDA_KERNELS`)
        return "cuda" if mamba_ssm_available() else "chunked"
    if device.type == "cpu":
        try:
            load_cpu_kernel()
        except RuntimeError as err:
            _warn_fallback_once(str(err))
            return "chunked"
        return "cpp"
    return "chunked"


def selective_scan_fn(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
) -> ScanResult:
    """Selective scan with mamba-ssm's signature and semantics, plus `reverse`.

    u, delta, z: (batch, dim, length); A: (dim, d_state); B, C: (batch, d_state, length);
    D, delta_bias: (dim,). Returns out: (batch, dim, length), and with
    `return_last_state` also the final state: (batch, dim, d_state) (for `reverse`, the
    state after step 0). See the module docstring for the dispatch rules.
    """
    impl = IMPLEMENTATIONS[
        resolve_implementation(u.device if isinstance(u, Tensor) else torch.device("cpu"))
    ]
    return impl(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse)
