"""The Mamba-1 mixer of SSAMBA/Vim/AuM, with its bidirectional variants, and the block around it.

Parameter names and shapes are exactly Vim's (`mamba-1p1p1/mamba_ssm/modules/mamba_simple.py`),
so official checkpoints load by key renames only:

    in_proj   d_model -> 2*d_inner (x and the gate z), no bias
    conv1d    depthwise, d_conv taps, with bias          } forward direction
    x_proj    d_inner -> dt_rank + 2*d_state (dt, B, C)  }
    dt_proj   dt_rank -> d_inner, with bias              }
    A_log     (d_inner, d_state), D (d_inner,)           }
    conv1d_b, x_proj_b, dt_proj_b, A_b_log, D_b          backward direction ("v2" only)
    out_proj  d_inner -> d_model, no bias

`bimamba`:
- "none": one causal direction (plain Mamba; AuM "Fo-Fo").
- "v1": the backward direction shares conv1d, x_proj, dt_proj and D and has its own
  A_b_log (AuM "Fo-Bi"); the causal conv output is scanned a second time in reverse.
- "v2": the backward direction has its own copies of everything except in_proj and
  out_proj (SSAMBA, AuM "Bi-Bi"). Upstream runs it as the forward recipe on flipped
  inputs; the conv on a flipped sequence is a conv that looks at the *future* taps
  x[t..t+3], which is what `_conv` computes here without flipping activations.

Both directions are summed; `divide_out` halves the sum (Vim's `if_devide_out`, always
on in SSAMBA). Upstream's fused v1 kernel never halves, so faithful v1 presets set it off.

Upstream's non-CUDA path silently drops the backward direction (the `*_b` parameters are
ignored); here every path computes both. Paths, all with the same parameters (checkpoints
move between them):
- CPU, C++ kernels available (the default): `ssamba.models.fused.mamba_inner`, one
  torch.library op for in_proj ... out_proj with its own backward, which keeps no
  (batch, length, d_inner) activation (see that module).
- CUDA with mamba-ssm's Mamba-1 kernels and causal-conv1d: "none" and "v2" run mamba-ssm's
  fused `mamba_inner_fn` (flips for the backward direction).
- Otherwise, and with `use_fast_path=False` or SSAMBA_SCAN=ref|chunked (the reference):
  the composed path, the depthwise conv then `ssamba.models.scan.selective_scan_fn`,
  whose `reverse=True` runs time backwards. The conv is causal-conv1d's kernel on CUDA
  when present, our C++ kernel on CPU when the scan runs the C++ kernel (float32/float64),
  else PyTorch's conv1d. On CPU x and z stay channels-last views of in_proj's output.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models import fused
from ssamba.models.layers import DropPath
from ssamba.models.scan import CUDA_KERNELS, resolve_implementation, selective_scan_fn

# Optional CUDA kernels (pip install 'ssamba[cuda]'); None where missing, with one warning
# at import on a machine with a GPU (`ssamba.models.scan.CUDA_KERNELS`).
causal_conv1d_fn = CUDA_KERNELS.causal_conv1d_fn
mamba_inner_fn = CUDA_KERNELS.mamba_inner_fn

BimambaType = Literal["none", "v1", "v2"]
BIMAMBA_TYPES = ("none", "v1", "v2")


class MambaMixer(nn.Module):
    """Selective-SSM token mixer; (batch, length, d_model) -> (batch, length, d_model).

    Initialisation is mamba-ssm's: dt_proj weight uniform in +-dt_rank^-0.5, dt_proj bias
    the inverse softplus of dt ~ logUniform[dt_min, dt_max] (floored at dt_init_floor),
    A_log = log(1..d_state) per channel (S4D-real), D = 1; A_log/D are tagged
    `_no_weight_decay`. `n_residual_layers` applies Vim's GPT-2-style rescale of
    out_proj (kaiming-uniform / sqrt(n_layers)). The backward direction gets the same dt
    init as the forward one; Vim leaves dt_proj_b at PyTorch's default and then zeroes its
    bias (dt = softplus(0) = 0.69 at init), a quirk we do not copy.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        dt_scale: float = 1.0,
        conv_bias: bool = True,
        bias: bool = False,
        bimamba: BimambaType = "v2",
        divide_out: bool = True,
        n_residual_layers: int | None = None,
        use_fast_path: bool = True,
    ) -> None:
        super().__init__()
        if bimamba not in BIMAMBA_TYPES:
            raise ValueError(f"bimamba: expected one of {BIMAMBA_TYPES}, got {bimamba!r}")
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.bimamba = bimamba
        self.divide_out = divide_out
        self.use_fast_path = use_fast_path

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias)
        self.conv1d = self._make_conv(conv_bias)
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        self.D = nn.Parameter(torch.empty(self.d_inner))
        if bimamba in ("v1", "v2"):
            self.A_b_log = nn.Parameter(torch.empty(self.d_inner, d_state))
        if bimamba == "v2":
            self.conv1d_b = self._make_conv(conv_bias)
            self.x_proj_b = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False)
            self.dt_proj_b = nn.Linear(self.dt_rank, self.d_inner, bias=True)
            self.D_b = nn.Parameter(torch.empty(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias)
        self._init_ssm(dt_min, dt_max, dt_init_floor, dt_scale)
        if n_residual_layers is not None:
            nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
            with torch.no_grad():
                self.out_proj.weight /= math.sqrt(n_residual_layers)

    def _make_conv(self, conv_bias: bool) -> nn.Conv1d:
        # padding is not part of the state dict; forward pads explicitly (see `_conv`).
        return nn.Conv1d(
            self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, bias=conv_bias
        )

    @torch.no_grad()
    def _init_ssm(self, dt_min: float, dt_max: float, floor: float, dt_scale: float) -> None:
        for dt_proj in self._per_direction("dt_proj", "dt_proj_b"):
            bound = self.dt_rank**-0.5 * dt_scale
            nn.init.uniform_(dt_proj.weight, -bound, bound)
            log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min))
            dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        for A_log in self._per_direction("A_log", "A_b_log"):
            # S4D-real: A = -(1, 2, ..., d_state) in every channel.
            A_log.copy_(torch.log(torch.arange(1, self.d_state + 1.0)).expand_as(A_log))
            A_log._no_weight_decay = True
        for D in self._per_direction("D", "D_b"):
            D.fill_(1.0)
            D._no_weight_decay = True

    def _per_direction(self, forward_name: str, backward_name: str) -> list:
        """The forward direction's module/parameter and the backward one's if it has its own."""
        backward = getattr(self, backward_name, None)
        return [getattr(self, forward_name)] + ([backward] if backward is not None else [])

    @property
    def bidirectional(self) -> bool:
        return self.bimamba != "none"

    # ------------------------------------------------------------------ forward
    def forward(self, hidden: Tensor, reverse: bool = False) -> Tensor:
        """hidden: (batch, length, d_model) -> (batch, length, d_model).

        `reverse` gives the mixer of the time-reversed sequence, flipped back,
        flip(mixer(flip(hidden))), as the second layer of SSAMBA's layer pairs computes it;
        the fused CPU path swaps the directions' time instead of flipping anything.
        """
        if self._cpu_fused_ok(hidden):
            return fused.mamba_inner(hidden, self, reverse)
        if reverse:
            return self(hidden.flip(1)).flip(1)
        if self._fused_ok(hidden):
            return self._forward_fused(hidden)
        # (batch, d_inner, length) views of the channels-last projection: no copies, and the
        # gradients of x and z assemble into (batch, length, 2 * d_inner) for in_proj's.
        x, z = (t.transpose(1, 2) for t in self.in_proj(hidden).chunk(2, dim=-1))
        if self.bimamba == "v1":
            # One causal conv and projection; the same inputs are scanned both ways.
            u, delta, B, C = self._ssm_inputs(x, self.conv1d, self.x_proj, self.dt_proj, False)
            bias = self.dt_proj.bias
            y = self._scan(u, delta, self.A_log, B, C, self.D, z, bias, reverse=False)
            y = y + self._scan(u, delta, self.A_b_log, B, C, self.D, z, bias, reverse=True)
        else:
            y = self._direction(x, z, reverse=False)
            if self.bimamba == "v2":
                y = y + self._direction(x, z, reverse=True)
        if self.bidirectional and self.divide_out:
            y = y * 0.5
        return self.out_proj(y.transpose(1, 2))

    def _direction_params(
        self, backward: bool
    ) -> tuple[nn.Conv1d, nn.Linear, nn.Linear, Tensor, Tensor]:
        """(conv1d, x_proj, dt_proj, A_log, D) of one direction of a v2 (or one-way) mixer."""
        if backward:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def _direction(self, x: Tensor, z: Tensor, reverse: bool) -> Tensor:
        """One direction with its own parameters; x, z: (batch, d_inner, length)."""
        conv, x_proj, dt_proj, A_log, D = self._direction_params(backward=reverse)
        u, delta, B, C = self._ssm_inputs(x, conv, x_proj, dt_proj, look_ahead=reverse)
        return self._scan(u, delta, A_log, B, C, D, z, dt_proj.bias, reverse=reverse)

    def _ssm_inputs(
        self,
        x: Tensor,
        conv: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        look_ahead: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """u, delta: (batch, d_inner, length); B, C: (batch, d_state, length).

        delta is returned without its bias: the scan adds dt_proj.bias and the softplus,
        as upstream does, so the kernel sees the same numbers on every path.
        """
        u = self._conv(x, conv, look_ahead)
        x_dbl = x_proj(u.transpose(1, 2))  # (batch, length, dt_rank + 2*d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight).transpose(1, 2)
        return u, delta, B.transpose(1, 2), C.transpose(1, 2)

    def _scan(
        self,
        u: Tensor,
        delta: Tensor,
        A_log: Tensor,
        B: Tensor,
        C: Tensor,
        D: Tensor,
        z: Tensor,
        delta_bias: Tensor,
        reverse: bool,
    ) -> Tensor:
        """(batch, d_inner, length): the selective scan gated by silu(z), time reversed or not."""
        return selective_scan_fn(
            u,
            delta,
            _state_matrix(A_log),
            B,
            C,
            D.float(),
            z=z,
            delta_bias=delta_bias.float(),
            delta_softplus=True,
            reverse=reverse,
        )

    def _conv(self, x: Tensor, conv: nn.Conv1d, look_ahead: bool) -> Tensor:
        """silu(depthwise conv); x: (batch, d_inner, length) -> same shape.

        Causal: out[t] = b + sum_k w[k] x[t-(K-1)+k]. Look-ahead (the backward direction):
        out[t] = b + sum_k w[k] x[t+(K-1)-k], i.e. upstream's causal conv applied to the
        flipped sequence, computed by flipping the K taps instead of the activations.
        """
        if x.is_cuda and causal_conv1d_fn is not None:
            weight = conv.weight.squeeze(1)
            if look_ahead:
                out = causal_conv1d_fn(
                    x.flip(-1).contiguous(), weight, conv.bias, activation="silu"
                )
                return out.flip(-1)
            return causal_conv1d_fn(x.contiguous(), weight, conv.bias, activation="silu")
        if _cpu_conv_applies(x, conv):
            return fused.causal_conv1d_silu(x, conv.weight, conv.bias, look_ahead)
        k, length = self.d_conv, x.shape[-1]
        weight = conv.weight.flip(-1) if look_ahead else conv.weight
        out = F.conv1d(x, weight, conv.bias, padding=k - 1, groups=self.d_inner)
        return F.silu(out[..., k - 1 :] if look_ahead else out[..., :length])

    def _cpu_fused_ok(self, hidden: Tensor) -> bool:
        """The fused CPU path (`ssamba.models.fused`) runs where the C++ scan does;
        `use_fast_path=False` or SSAMBA_SCAN=ref|chunked keep the composed path."""
        return (
            self.use_fast_path
            and hidden.device.type == "cpu"
            and self.dt_rank <= fused.MAX_DT_RANK
            and resolve_implementation(hidden.device) == "cpp"
        )

    def _fused_ok(self, hidden: Tensor) -> bool:
        return (
            self.use_fast_path
            and hidden.is_cuda
            and mamba_inner_fn is not None
            and causal_conv1d_fn is not None
            and self.bimamba != "v1"  # mainline mamba-ssm has no fused v1
        )

    def _forward_fused(self, hidden: Tensor) -> Tensor:
        """mamba-ssm's fused conv+scan+out_proj per direction; out_proj is linear, so
        out_proj((y_f + y_b)/2) = out_proj_{W/2}(y_f) + out_proj_{W/2}(y_b) (+ bias once)."""
        xz = self.in_proj(hidden).transpose(1, 2)  # (batch, 2*d_inner, length)
        scale = 0.5 if self.bidirectional and self.divide_out else 1.0
        out_weight = self.out_proj.weight * scale
        out = self._fused_direction(xz, out_weight, backward=False)
        if self.bimamba == "v2":
            out = out + self._fused_direction(xz.flip(-1), out_weight, backward=True).flip(1)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out

    def _fused_direction(self, xz: Tensor, out_weight: Tensor, backward: bool) -> Tensor:
        """(batch, length, d_model); xz: (batch, 2*d_inner, length), already flipped if backward."""
        conv, x_proj, dt_proj, A_log, D = self._direction_params(backward)
        return mamba_inner_fn(
            xz,
            conv.weight,
            conv.bias,
            x_proj.weight,
            dt_proj.weight,
            out_weight,
            None,
            _state_matrix(A_log),
            None,
            None,
            D.float(),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
        )

    def extra_repr(self) -> str:
        return f"bimamba={self.bimamba!r}, divide_out={self.divide_out}"


def _cpu_conv_applies(x: Tensor, conv: nn.Conv1d) -> bool:
    """The C++ conv runs where the C++ scan does (SSAMBA_SCAN=ref|chunked keep PyTorch's)."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and conv.weight.dtype == x.dtype
        and resolve_implementation(x.device) == "cpp"
    )


def _state_matrix(A_log: Tensor) -> Tensor:
    """A = -exp(A_log) in float32: (d_inner, d_state), negative so every state decays."""
    return -torch.exp(A_log.float())


class MambaBlock(nn.Module):
    """Vim's block, "Add -> Norm -> Mixer": returns the mixer output and the residual stream.

        residual = hidden                        (first block: residual is None)
        residual = residual + drop_path(hidden)  (otherwise)
        hidden   = mixer(norm(residual))

    Keeping the add before the norm lets the stack hand (hidden, residual) pairs around,
    which SSAMBA's flip-and-sum layer pairing relies on.
    """

    def __init__(self, mixer: MambaMixer, norm: nn.Module, drop_path: float = 0.0) -> None:
        super().__init__()
        self.mixer = mixer
        self.norm = norm
        self.drop_path = DropPath(drop_path)

    def forward(
        self, hidden: Tensor, residual: Tensor | None, reverse: bool = False
    ) -> tuple[Tensor, Tensor]:
        """hidden, residual: (batch, tokens, dim) -> (mixer output, new residual).

        `reverse`: the block of the time-reversed sequence, with its outputs flipped back;
        equal to flipping hidden and residual first and both outputs after (the add, norm and
        drop path work token by token), without the flips on the fused CPU path.
        """
        residual = hidden if residual is None else residual + self.drop_path(hidden)
        return self.mixer(self.norm(residual), reverse=reverse), residual
