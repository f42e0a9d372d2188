"""ViT/DeiT encoder block for the SSAST/AST peers, with timm's parameter names.

Names follow timm's `vision_transformer.Block` (norm1, attn.qkv, attn.proj, norm2,
mlp.fc1, mlp.fc2) so SSAST checkpoints map by renames only. Attention has two
implementations with the same parameters:
- "sdpa": `F.scaled_dot_product_attention`, memory linear in tokens on CPU (fused kernels);
- "naive": softmax(q k^T * scale) v with the (tokens x tokens) matrix materialised, as
  timm 0.4.5 and hence the original SSAST did; use it for fair speed/memory comparisons.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.layers import DropPath

AttentionImpl = Literal["sdpa", "naive"]
ATTENTION_IMPLS = ("sdpa", "naive")


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

    def forward(self, x: Tensor) -> Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (batch, heads, tokens, head_dim)
        if self.impl == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            weights = (q @ k.transpose(-2, -1)) * self.head_dim**-0.5  # (b, h, tokens, tokens)
            out = weights.softmax(dim=-1) @ v
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, impl={self.impl!r}"


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

    def forward(self, x: Tensor) -> Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        x = x + self.drop_path(self.attn(self.norm1(x)))
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
