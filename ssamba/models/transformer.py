"""ViT/DeiT encoder block for the SSAST/AST peers, with timm's parameter names.

Names follow timm's `vision_transformer.Block` (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2) so SSAST checkpoints map by renames only. Attention has two
implementations with the same parameters:
- "sdpa": `F.scaled_dot_product_attention`, memory linear in tokens on CPU (fused kernels);
- "naive": softmax(q k^T * scale) v with the (tokens x tokens) matrix materialised, as
  timm 0.4.5 and hence the original SSAST did; use it for fair speed/memory comparisons;
- "fta": factorized time/frequency attention over the (F, T) patch grid. With the same
  qkv and proj (so SSAST weights load unchanged), every patch attends once within its
  frequency row (over time) and once within its time column (over frequency), and the two
  outputs are averaged: cost F*T*(F+T) instead of (F*T)^2. Prefix tokens (cls, dist) join
  every row and every column, in both passes: they attend to and are attended by each
  row and column, and their output is the mean over all rows and columns, so they still
  summarise the whole clip. It needs the grid: `TransformerBlock(x, grid)`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.layers import DropPath

AttentionImpl = Literal["sdpa", "naive", "fta"]
ATTENTION_IMPLS = ("sdpa", "naive", "fta")
# (patch grid (F, T), prefix tokens, index of the first prefix token): what FTA needs.
GridLayout = tuple[tuple[int, int], int, int]


class Attention(nn.Module):
    """Multi-head self-attention; (batch, tokens, dim) -> (batch, tokens, dim)."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, impl: AttentionImpl = "sdpa"
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} must divide embed_dim={dim}")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention: expected one of {ATTENTION_IMPLS}, got {impl!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: GridLayout | None = None) -> Tensor:
        """x: (batch, tokens, dim) -> same; `grid` is required by (only) FTA."""
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        if self.impl == "fta":
            if grid is None:
                raise ValueError("attention 'fta' needs the patch grid: call block(x, grid)")
            out = factorized_attention(q, k, v, *grid)
        else:
            out = _attend(q, k, v, self.impl)
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, impl={self.impl!r}"


def _attend(q: Tensor, k: Tensor, v: Tensor, impl: str) -> Tensor:
    """softmax(q k^T / sqrt(d)) v over the last two dims; (..., L, d) -> (..., L, d)."""
    if impl == "naive":
        weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5  # (..., L, L)
        return weights.softmax(dim=-1) @ v
    lead = q.shape[:-2]
    flat = [t.reshape(-1, 1, *t.shape[-2:]) for t in (q, k, v)]
    return F.scaled_dot_product_attention(*flat).reshape(*lead, *q.shape[-2:])


def factorized_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    grid: tuple[int, int],
    prefix: int,
    start: int,
    inner: str = "sdpa",
) -> Tensor:
    """FTA: attention within frequency rows and within time columns, averaged.

    q, k, v: (batch, heads, prefix + F*T, head_dim), patches frequency-major, the prefix
    tokens at `start`. Returns the same shape. See the module docstring for the prefix.
    `inner`: how each row/column attends ("sdpa", or "naive" to count its FLOPs).
    """
    f, t = grid
    b, h, n, d = q.shape
    if n != prefix + f * t:
        raise ValueError(f"fta: {n} tokens, but grid {grid} + {prefix} prefix tokens")

    def split(z: Tensor) -> tuple[Tensor, Tensor]:
        patches = torch.cat([z[:, :, :start], z[:, :, start + prefix :]], dim=2)
        return z[:, :, start : start + prefix], patches.reshape(b, h, f, t, d)

    (qp, qg), (kp, kg), (vp, vg) = split(q), split(k), split(v)

    def along_last_axis(qg: Tensor, kg: Tensor, vg: Tensor) -> tuple[Tensor, Tensor]:
        """(b, h, groups, L, d) grids, prefix prepended to every group."""
        groups = qg.shape[2]

        def join(p: Tensor, g: Tensor) -> Tensor:
            return torch.cat([p.unsqueeze(2).expand(-1, -1, groups, -1, -1), g], dim=3)

        out = _attend(join(qp, qg), join(kp, kg), join(vp, vg), inner)
        return out[:, :, :, :prefix].mean(dim=2), out[:, :, :, prefix:]

    prefix_rows, rows = along_last_axis(qg, kg, vg)  # each row: attention over time
    columns = (z.transpose(2, 3) for z in (qg, kg, vg))  # (b, h, t, f, d)
    prefix_cols, cols = along_last_axis(*columns)  # each column: attention over frequency
    patches = (0.5 * (rows + cols.transpose(2, 3))).reshape(b, h, f * t, d)
    pre = 0.5 * (prefix_rows + prefix_cols)
    return torch.cat([patches[:, :, :start], pre, patches[:, :, start:]], dim=2)


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; (..., dim) -> (..., dim)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + drop_path(attn(norm1(x))), then x + drop_path(mlp(norm2(x)))."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        drop_path: float = 0.0,
        attention: AttentionImpl = "sdpa",
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, impl=attention)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.apply(_init_vit_weights)

    def forward(self, x: Tensor, grid: GridLayout | None = None) -> Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim); `grid`: for FTA only."""
        attended = self.attn(self.norm1(x)) if grid is None else self.attn(self.norm1(x), grid)
        x = x + self.drop_path(attended)
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _init_vit_weights(module: nn.Module) -> None:
    """timm's ViT/DeiT init: Linear ~ trunc_normal(0.02) with zero bias; LayerNorm 1/0."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
