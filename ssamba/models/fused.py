"""The Mamba mixer fused on CPU, and our C++ conv kernel, as torch.library ops.

`mamba_inner(hidden, mixer)` computes all of `MambaMixer`, in_proj to out_proj and both
directions, as one op (`ssamba::mamba_inner`) with its own backward
(`ssamba::mamba_inner_backward`), the CPU counterpart of mamba-ssm's `mamba_inner_fn`:

    xz = in_proj(hidden) = (x, z)
    per direction:  u = silu(conv1d(x)),  (dt, B, C) = x_proj(u),  delta = dt_proj.weight @ dt
                    y_dir = selective_scan(u, delta + dt_proj.bias, A, B, C, D, z)
    out = out_proj(scale * (y_forward + y_backward))          scale = 1/2 with divide_out

For its backward the op keeps the input, the weights, x_proj's output (dt_rank + 2 * d_state
numbers a token) and each scan's state every CHUNK steps: no (batch, length, d_inner)
activation. The backward recomputes xz with one matrix product, u with
one conv per direction, and gets y back from the scans' backward (which recompute the
states anyway) for out_proj's gradient; the gradients of x and z of both directions land
in one (batch, length, 2 * d_inner) tensor. dt_proj runs inside the scan kernel (delta =
dt_proj.weight @ dt per 16 channels, d dt and d dt_proj.weight in its backward), which
spares a (batch, length, d_inner) tensor each way and two skinny matrix products. Nothing
is flipped: the backward direction's conv looks ahead and its scan reads time backwards.
in_proj, x_proj and out_proj run in ATen on the channels-last (batch, length, channels)
tensors the kernels read and write.

`reverse=True` computes the mixer on the time-reversed sequence, flipped back,
flip(mixer(flip(h))), without flipping anything, as the second layer of SSAMBA's layer
pairs needs.

Half-precision inputs (bf16 autocast) are computed in float32 and the output cast back;
float64 (gradcheck) stays float64. Every op has a fake (meta) implementation, so the path
runs under `torch.compile(fullgraph=True)` and `torch.export`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from ssamba.models.scan import load_cpu_kernel

if TYPE_CHECKING:
    from ssamba.models.mamba import MambaMixer

# Steps between the scan states the fused forward keeps for its backward: 128 (not the
# composed path's 64) halves them at the same speed (measured within noise at L=513),
# e.g. 90 MB instead of 162 MB over a pretraining step of ssamba-tiny.
CHUNK = 128
# The scan kernel computes delta = dt_proj.weight @ dt for dt_rank up to this (d_model up
# to 2048); wider mixers take the composed path.
MAX_DT_RANK = 128


# --------------------------------------------------------------------------- conv1d + silu
@torch.library.custom_op("ssamba::causal_conv1d_silu", mutates_args=())
def causal_conv1d_silu(x: Tensor, weight: Tensor, bias: Tensor | None, look_ahead: bool) -> Tensor:
    """silu(depthwise conv1d), causal or look-ahead (`csrc/causal_conv1d.cpp`).

    x: (batch, dim, length), any strides; weight: (dim, 1, taps); bias: (dim,) or None.
    Returns (batch, dim, length) with channels-last memory. float32/float64 CPU tensors.
    """
    return load_cpu_kernel().conv_forward(x, weight.squeeze(1).contiguous(), bias, look_ahead, None)


@causal_conv1d_silu.register_fake
def _(x, weight, bias, look_ahead):
    return _channels_last_like(x)


@torch.library.custom_op("ssamba::causal_conv1d_silu_backward", mutates_args=())
def _conv_backward(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None, look_ahead: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """dx, dweight (dim, 1, taps), dbias (empty without a bias); recomputes the pre-activation."""
    dx, dweight, dbias = load_cpu_kernel().conv_backward(
        dout, x, weight.squeeze(1).contiguous(), bias, look_ahead, None, False
    )
    return dx, dweight.view_as(weight), _or_empty(dbias, x)


@_conv_backward.register_fake
def _(dout, x, weight, bias, look_ahead):
    return _channels_last_like(x), torch.empty_like(weight), _empty_like_or_none(bias, x)


def _conv_setup(ctx, inputs, output):
    x, weight, bias, look_ahead = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.look_ahead = look_ahead


def _conv_grad(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _conv_backward(dout, x, weight, bias, ctx.look_ahead)
    return dx, dweight, dbias if bias is not None else None, None


causal_conv1d_silu.register_autograd(_conv_grad, setup_context=_conv_setup)


# --------------------------------------------------------------------------- the fused mixer
class Direction(NamedTuple):
    """One direction's parameters (the v1 backward direction shares all but A)."""

    conv_weight: Tensor  # (d_inner, 1, d_conv)
    conv_bias: Tensor | None  # (d_inner,)
    x_proj_weight: Tensor  # (dt_rank + 2 * d_state, d_inner)
    dt_proj_weight: Tensor  # (d_inner, dt_rank)
    dt_proj_bias: Tensor  # (d_inner,)
    A_log: Tensor  # (d_inner, d_state)
    D: Tensor  # (d_inner,)


class _Layout(NamedTuple):
    """Which parameters the op's flat weight list holds, in the order of `weight_names`."""

    bimamba: str
    conv_bias: bool
    out_bias: bool
    in_proj: int  # 0: the op takes xz; 1: hidden and in_proj.weight; 2: and in_proj.bias

    def weight_names(self) -> list[str]:
        """The mixer's parameter names (its checkpoint keys), in the op's order."""
        names = ["in_proj.weight", "in_proj.bias"][: self.in_proj]

        def direction(suffix: str, a_log: str, d: str) -> list[str]:
            return [f"conv1d{suffix}.weight"] + [f"conv1d{suffix}.bias"] * self.conv_bias + [
                f"x_proj{suffix}.weight", f"dt_proj{suffix}.weight", f"dt_proj{suffix}.bias",
                a_log, d]  # fmt: skip

        names += direction("", "A_log", "D")
        if self.bimamba == "v2":
            names += direction("_b", "A_b_log", "D_b")
        elif self.bimamba == "v1":
            names.append("A_b_log")
        return names + ["out_proj.weight"] + ["out_proj.bias"] * self.out_bias


def mamba_inner(hidden: Tensor, mixer: MambaMixer, reverse: bool = False) -> Tensor:
    """The mixer; hidden: (batch, length, d_model) -> same shape.

    Uses the mixer's parameters (by their checkpoint names) and its bimamba and divide_out.
    in_proj runs inside the op, except under bf16 autocast, which runs it in bf16 outside (the op
    then takes xz and keeps it, at half size).
    """
    inside = not torch.is_autocast_enabled("cpu")
    in_proj = (1 + (mixer.in_proj.bias is not None)) if inside else 0
    x = hidden if inside else mixer.in_proj(hidden)
    layout = _Layout(
        mixer.bimamba, mixer.conv1d.bias is not None, mixer.out_proj.bias is not None, in_proj
    )
    # getattr, not named_parameters(): also sees values swapped in by torch.func/stateless.
    weights = [
        getattr(getattr(mixer, module), attr) if attr else getattr(mixer, module)
        for module, _, attr in (name.partition(".") for name in layout.weight_names())
    ]
    scale = 0.5 if mixer.bidirectional and mixer.divide_out else 1.0
    # Keep what the backward needs only if there will be one (not at inference).
    save = torch.is_grad_enabled() and (x.requires_grad or any(w.requires_grad for w in weights))
    out, *_ = torch.ops.ssamba.mamba_inner(x, weights, *layout, scale, reverse, save)
    return out


@torch.library.custom_op("ssamba::mamba_inner", mutates_args=())
def _mamba_inner_op(
    x: Tensor,
    weights: list[Tensor],
    bimamba: str,
    conv_bias: bool,
    out_bias: bool,
    in_proj: int,
    scale: float,
    reverse: bool,
    save: bool,
) -> list[Tensor]:
    """[out (batch, length, d_model), *saved]: with `save`, what the backward needs, per
    scan the states every CHUNK steps (batch, chunks, d_state, d_inner) and per group of
    scans sharing inputs x_proj's output (batch * length, dt_rank + 2 * d_state); in_proj's
    output is recomputed.

    x: hidden (batch, length, d_model) if the layout has in_proj, else in_proj's output xz
    (batch, length, 2 * d_inner); weights: the layout's parameters (`_Layout.weight_names`).
    """
    p = _Params.of(x, weights, _Layout(bimamba, conv_bias, out_bias, in_proj))
    with torch.autocast("cpu", enabled=False):
        return _forward(x, p, scale, reverse, save)


@_mamba_inner_op.register_fake
def _(x, weights, bimamba, conv_bias, out_bias, in_proj, scale, reverse, save):
    p = _Params.of(x, weights, _Layout(bimamba, conv_bias, out_bias, in_proj), cast=False)
    batch, length, _ = x.shape
    out = x.new_empty(batch, length, p.out_proj_weight.shape[0])
    saved = _new_saved(x, _groups(p, reverse)) if save else []
    return [out, *saved]


@torch.library.custom_op("ssamba::mamba_inner_backward", mutates_args=())
def _mamba_inner_backward_op(
    dout: Tensor,
    x: Tensor,
    weights: list[Tensor],
    saved: list[Tensor],
    bimamba: str,
    conv_bias: bool,
    out_bias: bool,
    in_proj: int,
    scale: float,
    reverse: bool,
) -> list[Tensor]:
    """[d x, d weight for each weight]; saved: the forward's outputs after `out`."""
    p = _Params.of(x, weights, _Layout(bimamba, conv_bias, out_bias, in_proj))
    with torch.autocast("cpu", enabled=False):
        grads = _backward(dout, x, p, saved, scale, reverse)
    # Each gradient in its input's dtype (bf16 activations, float32 weights under autocast),
    # contiguous as the fake implementation promises.
    return [g.to(t.dtype).contiguous() for g, t in zip(grads, [x, *weights], strict=True)]


@_mamba_inner_backward_op.register_fake
def _(dout, x, weights, saved, bimamba, conv_bias, out_bias, in_proj, scale, reverse):
    return [t.new_empty(t.shape) for t in [x, *weights]]


def _setup_context(ctx, inputs, output):
    x, weights, *options, _ = inputs
    ctx.options = options
    ctx.n_weights = len(weights)
    ctx.save_for_backward(x, *weights, *output[1:])


def _grad(ctx, grads):
    x, *rest = ctx.saved_tensors
    weights, saved = rest[: ctx.n_weights], rest[ctx.n_weights :]
    if not saved:  # called with save=False after all: run the forward again to get them
        saved = torch.ops.ssamba.mamba_inner(x, weights, *ctx.options, True)[1:]
    dx, *dweights = torch.ops.ssamba.mamba_inner_backward(grads[0], x, weights, saved, *ctx.options)
    return dx, dweights, *[None] * 7


_mamba_inner_op.register_autograd(_grad, setup_context=_setup_context)


class _Params(NamedTuple):
    """The op's weights, unflattened (in the compute dtype unless `cast=False`)."""

    in_proj_weight: Tensor | None  # (2 * d_inner, d_model), if the op runs in_proj
    in_proj_bias: Tensor | None
    forward: Direction
    backward: Direction | None  # v2: its own; v1: forward's with A_b_log; none: None
    out_proj_weight: Tensor
    out_proj_bias: Tensor | None
    bimamba: str

    @classmethod
    def of(cls, xz: Tensor, weights: list[Tensor], layout: _Layout, cast: bool = True) -> _Params:
        dtype = _compute_dtype(xz.dtype)
        it = iter(t.to(dtype) if cast else t for t in weights)
        in_w = next(it) if layout.in_proj else None
        in_b = next(it) if layout.in_proj == 2 else None

        def direction() -> Direction:
            conv_w = next(it)
            conv_b = next(it) if layout.conv_bias else None
            return Direction(conv_w, conv_b, *(next(it) for _ in range(5)))

        forward = direction()
        backward = None
        if layout.bimamba == "v2":
            backward = direction()
        elif layout.bimamba == "v1":
            backward = forward._replace(A_log=next(it))
        out_w = next(it)
        out_b = next(it) if layout.out_bias else None
        return cls(in_w, in_b, forward, backward, out_w, out_b, layout.bimamba)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(length: int) -> int:
    return max(1, -(-length // CHUNK))


def _channels_last_like(x: Tensor) -> Tensor:
    """(batch, dim, length) tensor whose memory is (batch, length, dim)."""
    return x.new_empty(x.shape[0], x.shape[2], x.shape[1]).transpose(1, 2)


def _or_empty(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else t


def _empty_like_or_none(t: Tensor | None, like: Tensor) -> Tensor:
    return like.new_empty(0) if t is None else torch.empty_like(t)


def _channels(t: Tensor | None) -> Tensor | None:
    """(batch, length, n) -> the (batch, n, length) view the kernels take."""
    return None if t is None else t.transpose(1, 2)


def _rows(t: Tensor) -> Tensor:
    """(batch, n, length) view of (batch, length, n) memory -> its (batch * length, n) matrix."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])


class _ScanInputs(NamedTuple):
    """What a group's scans read: (batch, rows, length) views of channels-last matrices."""

    u: Tensor  # (batch, d_inner, length): silu(conv1d(x))
    x_dbl: Tensor  # (batch * length, dt_rank + 2 * d_state): x_proj(u) = (dt, B, C)
    dt: Tensor  # (batch, dt_rank, length); the kernel computes delta = dt_proj.weight @ dt
    B: Tensor  # (batch, d_state, length)
    C: Tensor


def _scan_inputs(
    x: Tensor,
    d: Direction,
    look_ahead: bool,
    x_dbl: Tensor | None = None,
    x_dbl_out: Tensor | None = None,
    u_out: Tensor | None = None,
) -> _ScanInputs:
    """u from x (into u_out: (batch, length, d_inner), if given), and x_dbl = x_proj(u)
    (into x_dbl_out if given) unless the forward kept it."""
    batch, _, length = x.shape
    u = load_cpu_kernel().conv_forward(
        x, d.conv_weight.squeeze(1), d.conv_bias, look_ahead, _channels(u_out)
    )
    if x_dbl is None:
        x_dbl = torch.mm(_rows(u), d.x_proj_weight.t(), out=x_dbl_out)
    rank, d_state = d.dt_proj_weight.shape[1], d.A_log.shape[1]
    dt, B, C = (
        t.view(batch, length, -1).transpose(1, 2) for t in x_dbl.split([rank, d_state, d_state], 1)
    )
    return _ScanInputs(u, x_dbl, dt, B, C)


def _groups(p: _Params, reverse: bool) -> list[list[tuple[Direction, bool]]]:
    """The scans as (parameters, time reversed), grouped by the inputs they share: v1's two
    scans read one conv and projection, v2's directions have their own. `reverse` swaps
    the time direction of every scan."""
    if p.backward is None:
        return [[(p.forward, reverse)]]
    if p.bimamba == "v1":
        return [[(p.forward, reverse), (p.backward, not reverse)]]
    return [[(p.forward, reverse)], [(p.backward, not reverse)]]


class _Workspace(threading.local):
    """The mixer's (batch, length, d_inner) temporaries (xz, y, u), reused from call to call.

    Training: a pretraining step allocates and frees several such tensors per layer
    between the activations it keeps; with glibc's allocator the holes they left made the
    resident memory about twice what was in use (in use 1.3 GB, resident 2.5 GB).
    Inference: glibc serves every block over 32 MB with a fresh mmap, which the kernel
    zero-fills page by page on first touch, call after call; at batch 4 and 16k tokens
    those page faults made elementwise work 4-8x slower per token than at 4k (the
    benchmark's inference time slope 1.15 instead of linear). Kept per thread, each at the
    largest size asked for (at 22k tokens, batch 1, tiny: about 135 MB), until
    `release_workspace`.
    """

    def __init__(self) -> None:
        self.buffers: dict[str, Tensor] = {}

    def __call__(self, name: str, like: Tensor, width: int) -> Tensor:
        """(batch, length, width) tensor of like's dtype, contents undefined."""
        shape = (*like.shape[:2], width)
        numel = shape[0] * shape[1] * width
        buffer = self.buffers.get(name)
        if buffer is None or buffer.numel() < numel or buffer.dtype != like.dtype:
            # A normal tensor even when first asked for under inference_mode (Lightning
            # validates in it): an inference tensor could not be written outside it.
            with torch.inference_mode(False):
                buffer = self.buffers[name] = like.new_empty(numel)
        return buffer[:numel].view(shape)


_workspace = _Workspace()


def release_workspace() -> None:
    """Free this thread's mixer temporaries (after a long input, when memory matters more
    than the next call's speed)."""
    _workspace.buffers.clear()


def _forward(inp: Tensor, p: _Params, scale: float, reverse: bool, save: bool) -> list[Tensor]:
    """[out, *saved] (see the op); the scans add scale * their output into one y.

    What outlives the call (out, and with `save` the states and x_dbl) is
    allocated before the temporaries (xz, y, u), which come from the workspace.
    """
    kernel = load_cpu_kernel()
    out_dtype, inp = inp.dtype, inp.to(_compute_dtype(inp.dtype))
    batch, length, _ = inp.shape
    d_inner = p.forward.A_log.shape[0]
    groups = _groups(p, reverse)
    out = inp.new_empty(batch * length, p.out_proj_weight.shape[0])
    saved = _new_saved(inp, groups) if save else []

    xz_out = _workspace("xz", inp, 2 * d_inner)
    xz = _in_proj(inp, p, xz_out if p.in_proj_weight is not None else None)
    x, z = (_channels(t) for t in xz.split(d_inner, dim=-1))
    y = _workspace("y", inp, d_inner)
    kept = iter(saved)
    first = True
    for group in groups:
        states = [next(kept) if save else None for _ in group]
        x_dbl = next(kept) if save else None
        s = _scan_inputs(x, *group[0], x_dbl_out=x_dbl, u_out=_workspace("u", inp, d_inner))
        for (d, rev), chunk_states in zip(group, states, strict=True):
            kernel.scan_forward(
                s.u, s.dt, -torch.exp(d.A_log), s.B, s.C, d.D, z, d.dt_proj_bias, True, rev,
                CHUNK, scale, y.transpose(1, 2), not first, d.dt_proj_weight, chunk_states, save,
            )  # fmt: skip
            first = False
        del s  # free u before the next direction's
    del x, z, xz
    torch.mm(y.view(-1, y.shape[-1]), p.out_proj_weight.t(), out=out)
    if p.out_proj_bias is not None:
        out += p.out_proj_bias
    return [out.view(batch, length, -1).to(out_dtype), *saved]


def _in_proj(inp: Tensor, p: _Params, out: Tensor | None) -> Tensor:
    """xz (batch, length, 2 * d_inner): in_proj(hidden) written into `out`, or the op's input
    if it is xz already."""
    if out is None:
        return inp
    rows = out.view(-1, out.shape[-1])
    hidden = inp.reshape(-1, inp.shape[-1])
    if p.in_proj_bias is None:
        torch.mm(hidden, p.in_proj_weight.t(), out=rows)
    else:
        torch.addmm(p.in_proj_bias, hidden, p.in_proj_weight.t(), out=rows)
    return out


def _new_saved(xz: Tensor, groups: list) -> list[Tensor]:
    """Empty tensors for what the backward needs: per group, each scan's states every CHUNK
    steps (batch, chunks, d_state, d_inner), then x_proj's output (batch * length, rows)."""
    batch, length, _ = xz.shape
    dtype = _compute_dtype(xz.dtype)
    saved = []
    for group in groups:
        d = group[0][0]
        d_inner, d_state = d.A_log.shape
        for _ in group:
            saved.append(xz.new_empty(batch, _chunks(length), d_state, d_inner, dtype=dtype))
        saved.append(xz.new_empty(batch * length, d.x_proj_weight.shape[0], dtype=dtype))
    return saved


def _backward(
    dout: Tensor,
    inp: Tensor,
    p: _Params,
    saved: list[Tensor],
    scale: float,
    reverse: bool,
) -> list[Tensor]:
    """Gradients of the op's input and of the weights in its order, in the compute dtype."""
    kernel = load_cpu_kernel()
    d_inner = p.forward.A_log.shape[0]
    inp = inp.to(_compute_dtype(inp.dtype)).contiguous()
    # What outlives the call first (see _forward): d hidden, or d xz (then the op's input).
    d_inp = torch.empty_like(inp)
    in_proj = p.in_proj_weight is not None
    xz = _in_proj(inp, p, _workspace("xz", inp, 2 * d_inner) if in_proj else None)
    x, z = (_channels(t) for t in xz.split(d_inner, dim=-1))
    # Both directions' dx and dz land here.
    dxz = _workspace("dxz", inp, 2 * d_inner) if in_proj else d_inp
    dx, dz = (_channels(t) for t in dxz.split(d_inner, dim=-1))
    dout = dout.to(xz.dtype).reshape(-1, dout.shape[-1])
    # d loss / d(scaled sum of the directions); the kernels apply the scale themselves.
    dy = _workspace("dy", inp, d_inner)
    torch.mm(dout, p.out_proj_weight, out=dy.view(-1, d_inner))
    dy = _channels(dy)
    y = _channels(_workspace("y", inp, d_inner))  # the scaled sum again, from the scans' backward
    saved = iter(saved)
    first = True
    per_group = []
    for group in _groups(p, reverse):
        conv, look_ahead = group[0]
        states = [next(saved) for _ in group]
        s = _scan_inputs(x, conv, look_ahead, next(saved), u_out=_workspace("u", inp, d_inner))
        du = _channels(_workspace("du", inp, d_inner))
        ddt = dB = dC = None
        per_scan = []  # d dt_proj.weight, d dt_proj.bias, d A_log, d D of each scan
        for (d, rev), chunk_states in zip(group, states, strict=True):
            A = -torch.exp(d.A_log)
            du, ddt_i, dA, dB_i, dC_i, dD, _, dbias, d_dt_w = kernel.scan_backward(
                dy, None, s.u, s.dt, A, s.B, s.C, d.D, z, d.dt_proj_bias, chunk_states, True,
                rev, CHUNK, scale, du, None, dz, y, not first, d is not conv, d.dt_proj_weight,
            )  # fmt: skip
            first = False
            ddt, dB, dC = (
                (ddt_i, dB_i, dC_i) if ddt is None else (ddt + ddt_i, dB + dB_i, dC + dC_i)
            )
            per_scan.append([d_dt_w, dbias, dA * A, dD])
        # Back through (dt, B, C) = x_proj(u), then the conv, into dx.
        dx_dbl = torch.cat([_rows(ddt), _rows(dB), _rows(dC)], 1)
        d_x_proj = torch.mm(dx_dbl.t(), _rows(s.u))
        _rows(du).addmm_(dx_dbl, conv.x_proj_weight)
        _, d_conv_w, d_conv_b = kernel.conv_backward(
            du, x, conv.conv_weight.squeeze(1), conv.conv_bias, look_ahead, dx, bool(per_group)
        )
        shared = [d_conv_w.view_as(conv.conv_weight)]
        shared += [d_conv_b] if conv.conv_bias is not None else []
        per_group.append(([*shared, d_x_proj], per_scan))
        del s, du
    grads = [d_inp]
    if in_proj:  # back through xz = in_proj(hidden)
        dxz_rows, hidden = dxz.view(-1, 2 * d_inner), inp.view(-1, inp.shape[-1])
        torch.mm(dxz_rows, p.in_proj_weight, out=d_inp.view(-1, inp.shape[-1]))
        grads.append(torch.mm(dxz_rows.t(), hidden))
        if p.in_proj_bias is not None:
            grads.append(dxz_rows.sum(0))
    for shared, per_scan in per_group:
        if p.bimamba == "v1":  # one conv, projections, dt_proj and D for both scans
            (dt_w, dt_b, dA, dD), (dt_w_b, dt_b_b, dA_b, dD_b) = per_scan
            grads += [*shared, dt_w + dt_w_b, dt_b + dt_b_b, dA, dD + dD_b, dA_b]
        else:
            grads += [*shared, *per_scan[0]]
    grads.append(torch.mm(dout.t(), _rows(y)))
    if p.out_proj_bias is not None:
        grads.append(dout.sum(0))
    return grads
