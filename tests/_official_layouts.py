"""Official SSAMBA / SSAST / AuM checkpoints with the originals' key layouts and shapes
(docs/originals.md#checkpoints) and random values: no official weights are downloaded."""

from __future__ import annotations

import math

import torch

DIM, DEPTH, FRAMES = 64, 2, 64  # 16x16 patches at 64 frames: grid 8 x 4 = 32 patches


def _random(*shape: int) -> torch.Tensor:
    return torch.randn(*shape)


def _ssl_extras(dim: int, frames: int) -> dict[str, torch.Tensor]:
    """What both SSL code bases add next to `v`: geometry, mask embedding, MSPM heads."""
    out = {
        "module.p_input_fdim": torch.tensor(128),
        "module.p_input_tdim": torch.tensor(frames),
        "module.mask_embed": _random(1, 1, dim),
    }
    for head in ("cpredlayer", "gpredlayer"):
        out |= {
            f"module.{head}.0.weight": _random(dim, dim),
            f"module.{head}.0.bias": _random(dim),
            f"module.{head}.2.weight": _random(256, dim),
            f"module.{head}.2.bias": _random(256),
        }
    return out


def _mamba_layers(prefix: str, dim: int, bimamba: str, norm_bias: bool) -> dict[str, torch.Tensor]:
    rank, inner = math.ceil(dim / 16), 2 * dim
    out = {}
    for i in range(DEPTH):
        p = f"{prefix}layers.{i}."
        out[p + "norm.weight"] = _random(dim)
        if norm_bias:
            out[p + "norm.bias"] = _random(dim)
        directions = {"v2": ["", "_b"], "v1": [""], "none": [""]}[bimamba]
        for s in directions:
            out |= {
                f"{p}mixer.conv1d{s}.weight": _random(inner, 1, 4),
                f"{p}mixer.conv1d{s}.bias": _random(inner),
                f"{p}mixer.x_proj{s}.weight": _random(rank + 32, inner),
                f"{p}mixer.dt_proj{s}.weight": _random(inner, rank),
                f"{p}mixer.dt_proj{s}.bias": _random(inner),
                f"{p}mixer.D{s}": _random(inner),
            }
        out[p + "mixer.A_log"] = _random(inner, 16)
        if bimamba != "none":
            out[p + "mixer.A_b_log"] = _random(inner, 16)
        out[p + "mixer.in_proj.weight"] = _random(4 * dim, dim)
        out[p + "mixer.out_proj.weight"] = _random(dim, inner)
    return out


def official_ssamba(dim: int = DIM, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """A pretrained SSAMBA `.pth` with the official key names and shapes, random values."""
    patches = 8 * (frames // 16)
    sd = {
        "module.v.cls_token": _random(1, 1, dim),
        "module.v.pos_embed": _random(1, 1 + patches, dim),
        "module.v.patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "module.v.patch_embed.proj.bias": _random(dim),
        "module.v.head.weight": _random(1000, dim),
        "module.v.head.bias": _random(1000),
        "module.v.norm_f.weight": _random(dim),
        "module.v.norm_f.bias": _random(dim),
    }
    return sd | _mamba_layers("module.v.", dim, "v2", norm_bias=True) | _ssl_extras(dim, frames)


def official_ssast(dim: int = DIM, frames: int = FRAMES) -> dict[str, torch.Tensor]:
    """A pretrained SSAST `.pth` (timm DeiT under `module.v.`), random values."""
    patches = 8 * (frames // 16)
    sd = {
        "module.v.cls_token": _random(1, 1, dim),
        "module.v.dist_token": _random(1, 1, dim),
        "module.v.pos_embed": _random(1, 2 + patches, dim),
        "module.v.patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "module.v.patch_embed.proj.bias": _random(dim),
        "module.v.norm.weight": _random(dim),
        "module.v.norm.bias": _random(dim),
        "module.v.head.weight": _random(1000, dim),
        "module.v.head.bias": _random(1000),
        "module.v.head_dist.weight": _random(1000, dim),
        "module.v.head_dist.bias": _random(1000),
    }
    for i in range(DEPTH):
        p = f"module.v.blocks.{i}."
        for norm in ("norm1", "norm2"):
            sd |= {f"{p}{norm}.weight": _random(dim), f"{p}{norm}.bias": _random(dim)}
        for name, (out, inp) in {
            "attn.qkv": (3 * dim, dim),
            "attn.proj": (dim, dim),
            "mlp.fc1": (4 * dim, dim),
            "mlp.fc2": (dim, 4 * dim),
        }.items():
            sd |= {f"{p}{name}.weight": _random(out, inp), f"{p}{name}.bias": _random(out)}
    return sd | _ssl_extras(dim, frames)


def official_aum(bimamba: str = "v2", dim: int = DIM) -> dict[str, torch.Tensor]:
    """An AuM classifier (RMSNorm, `pos_embed.pos_embed`, no `module.`), 1024 frames."""
    sd = {
        "cls_token": _random(1, 1, dim),
        "pos_embed.pos_embed": _random(1, 1 + 512, dim),
        "patch_embed.proj.weight": _random(dim, 1, 16, 16),
        "patch_embed.proj.bias": _random(dim),
        "norm_f.weight": _random(dim),
        "head.weight": _random(527, dim),
        "head.bias": _random(527),
    }
    return sd | _mamba_layers("", dim, bimamba, norm_bias=False)
