"""The official SSAMBA, SSAST and AuM checkpoints: read them into our encoder, write them back.

The originals save `nn.DataParallel` state dicts with a `module.` prefix
(docs/originals.md#checkpoints):

    SSAMBA  module.v.{patch_embed.proj, cls_token, pos_embed, layers.i.{norm, mixer.*}, norm_f}
    SSAST   module.v.{patch_embed.proj, cls_token, dist_token, pos_embed, blocks.i.*, norm}
    both    module.mask_embed, module.{cpredlayer, gpredlayer}.* (pretraining heads),
            module.mlp_head.* (fine-tuned), module.p_input_{fdim,tdim} (pretraining geometry),
            module.v.head[_dist].* (an unused 1000-class ImageNet head: dropped)
    AuM     {patch_embed.proj, cls_token, pos_embed.pos_embed, layers.i.*, norm_f, head}
            (`module.` optional; `head` is its trained classifier: returned as a head)

Keys are checked strictly: anything missing or unrecognised raises `CheckpointError`
naming the keys, instead of the originals' `strict=False` silently dropping them.
Reading files goes through `ssamba.models.encoder_file.load_encoder_file`, the one loader;
this module works on state dicts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ssamba.models.encoder import FAMILIES, AudioEncoder, EncoderConfig
from ssamba.models.patching import patch_grid

_MODULE = "module."
# The fine-tuning stride of every official SSAMBA/SSAST recipe (ESC-50, AudioSet, Speech
# Commands); fine-tuned files do not record it.
OFFICIAL_FINETUNE_STRIDE = 10


class CheckpointError(ValueError):
    """A checkpoint that does not fit: wrong kind, missing/unexpected keys, wrong shapes."""


def load_strict(encoder: AudioEncoder, state: Mapping[str, Tensor], source: str) -> None:
    """`encoder.load_state_dict` that names every missing, unexpected or mis-shaped key."""
    own = encoder.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match the {encoder.cfg.family} encoder: "
            f"missing {short_list(missing)}, unexpected {short_list(unexpected)}"
        )
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if tuple(state[k].shape) != tuple(v.shape)
    ]
    if wrong:
        raise CheckpointError(f"{source}: shapes differ (file vs encoder): {short_list(wrong)}")
    encoder.load_state_dict(state)


def short_list(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True)
class OfficialLayout:
    """How one original code base names the encoder inside its (prefix-stripped) state dict."""

    encoder_prefix: str  # official key = prefix + our key (after `renames`)
    renames: Mapping[str, str]  # our key -> official key (without prefix)
    heads: tuple[str, ...]  # key prefixes returned as heads
    dropped: tuple[str, ...]  # key prefixes dropped knowingly
    has_mask_embed: bool  # written by the SSL code bases at the top level
    metadata: tuple[str, ...] = ("p_input_fdim", "p_input_tdim")


_HEADS = ("cpredlayer.", "gpredlayer.", "mlp_head.")
LAYOUTS = {
    "ssamba": OfficialLayout("v.", {}, _HEADS, ("v.head.",), has_mask_embed=True),
    "ssast": OfficialLayout("v.", {}, _HEADS, ("v.head.", "v.head_dist."), has_mask_embed=True),
    "aum": OfficialLayout("", {"pos_embed": "pos_embed.pos_embed"}, ("head.",), (), False),
}


def official_family(state: Mapping[str, Any]) -> str:
    """Which original code base wrote a state dict, told apart by its key layout.

    SSAST (timm DeiT) has `blocks.*`; AuM has `pos_embed.pos_embed` and no `v.`; else SSAMBA.
    """
    keys = [k.removeprefix(_MODULE) for k in state]
    if any(k.startswith("v.blocks.") for k in keys):
        return "ssast"
    if "pos_embed.pos_embed" in keys:
        return "aum"
    return "ssamba"


def load_official(
    state: Mapping[str, Any],
    family: str | None = "ssamba",
    input_frames: int | None = None,
    stride: tuple[int, int] | int | None = None,
    source_stride: tuple[int, int] | int | None = None,
    source: str = "<state dict>",
    **overrides: Any,
) -> tuple[AudioEncoder, dict[str, Tensor]]:
    """Encoder and heads from the state dict of an official SSAMBA / SSAST / AuM checkpoint.

    The architecture is read off the tensors: width and patch grid from pos_embed and the
    patch projection, depth from the layer indices, norm type from the presence of norm
    biases, bimamba type from the `*_b` keys, d_state/expand/d_conv/dt_rank from their
    shapes; SSAST heads = width / 64 (DeiT). The input length comes from `p_input_tdim`
    when present (pretrained SSAMBA/SSAST files, stride = patch); otherwise from the grid
    and `source_stride`, the stride the file was trained with: required for fine-tuned
    SSAMBA/SSAST files (`OFFICIAL_FINETUNE_STRIDE` in the official recipes), default
    patch-sized for AuM; of the input lengths that give the grid, the multiple of 16 (the
    recipes' 128, 512, 1024) is taken.
    `input_frames` / `stride` then re-target the encoder (`AudioEncoder.resize_input`);
    other keyword arguments override EncoderConfig fields that the file cannot tell
    (e.g. drop_path_rate=0.0, attention="naive"). `family=None` detects it; `source`
    names the file in errors.

    Returns the encoder and a dict of the heads (`cpredlayer.*`, `gpredlayer.*`,
    `mlp_head.*`; AuM `head.*`) with `module.` removed. A missing `mask_embed` (AuM, fine-tuned
    files) keeps its fresh initialisation; every other missing or unknown key raises.
    """
    name = source  # for error messages
    state = _unwrap(state, name)
    family = family or official_family(state)
    if family not in LAYOUTS:
        raise ValueError(f"family: expected one of {FAMILIES}, got {family!r}")
    ours, heads, meta = _split_official(state, LAYOUTS[family], family, name)
    cfg = _infer_config(ours, meta, family, source_stride, overrides, name)
    encoder = AudioEncoder(cfg)
    ours.setdefault("mask_embed", encoder.mask_embed.detach().clone())
    load_strict(encoder, ours, source=f"{name} ({family})")
    if input_frames is not None or stride is not None:
        encoder.resize_input(input_frames=input_frames, stride=stride)
    return encoder, heads


def to_official(
    encoder: AudioEncoder, heads: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The encoder (and heads) as the original code base of its family names them,
    with the `module.` prefix its loaders expect; the inverse of `load_official`.

    `p_input_fdim/tdim` record the current input geometry, which the originals' fine-tune
    loaders read as the pretraining geometry (so export at stride == patch).
    """
    layout = LAYOUTS[encoder.cfg.family]
    out: dict[str, Tensor] = {}
    for key, value in encoder.state_dict().items():
        if key == "mask_embed":
            if layout.has_mask_embed:
                out[_MODULE + key] = value
            continue
        out[_MODULE + layout.encoder_prefix + layout.renames.get(key, key)] = value
    if layout.has_mask_embed:
        out[_MODULE + "p_input_fdim"] = torch.tensor(encoder.cfg.num_mel_bins)
        out[_MODULE + "p_input_tdim"] = torch.tensor(encoder.cfg.input_frames)
    for key, value in (heads or {}).items():
        out[_MODULE + key] = value
    return out


def _unwrap(obj: Any, name: str) -> Mapping[str, Tensor]:
    """The state dict itself, also when saved as {"model": sd} / {"state_dict": sd}."""
    if isinstance(obj, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise CheckpointError(f"{name}: expected a state dict of tensors")
    return obj


def _split_official(
    state: Mapping[str, Tensor], layout: OfficialLayout, family: str, name: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Sort official keys into (our encoder keys, heads, metadata); dropped keys vanish,
    keys of no known kind raise."""
    to_ours = {official: ours for ours, official in layout.renames.items()}
    ours: dict[str, Tensor] = {}
    heads: dict[str, Tensor] = {}
    meta: dict[str, Tensor] = {}
    unknown: list[str] = []
    for raw_key, value in state.items():
        key = raw_key.removeprefix(_MODULE)
        if key in layout.metadata:
            meta[key] = value
        elif key.startswith(layout.heads):
            heads[key] = value
        elif key.startswith(layout.dropped):
            continue
        elif layout.has_mask_embed and key == "mask_embed":
            ours[key] = value
        elif key.startswith(layout.encoder_prefix):
            rest = key[len(layout.encoder_prefix) :]
            ours[to_ours.get(rest, rest)] = value
        else:
            unknown.append(raw_key)
    if unknown:
        raise CheckpointError(f"{name}: keys unknown to the {family} layout: {short_list(unknown)}")
    for needed in ("pos_embed", "patch_embed.proj.weight"):
        if needed not in ours:
            raise CheckpointError(f"{name}: not a {family} checkpoint: missing {needed!r}")
    return ours, heads, meta


def _infer_config(
    state: Mapping[str, Tensor],
    meta: Mapping[str, Tensor],
    family: str,
    source_stride: tuple[int, int] | int | None,
    overrides: dict[str, Any],
    name: str,
) -> EncoderConfig:
    """EncoderConfig of the checkpoint's own geometry, read off the tensor shapes."""
    dim = state["pos_embed"].shape[-1]
    patch = tuple(state["patch_embed.proj.weight"].shape[-2:])
    prefix = 2 if "dist_token" in state else 1
    block = "blocks" if family == "ssast" else "layers"
    indices = {int(m.group(1)) for k in state if (m := re.match(rf"{block}\.(\d+)\.", k))}
    if not indices:
        raise CheckpointError(f"{name}: no {block}.<i>.* keys; is this a {family} checkpoint?")
    fields: dict[str, Any] = {"embed_dim": dim, "depth": max(indices) + 1, "patch": patch}
    fields["prefix_tokens"] = prefix
    if family == "ssast":
        fields["num_heads"] = max(1, dim // 64)
        fields["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / dim
        fields["qkv_bias"] = "blocks.0.attn.qkv.bias" in state
    else:
        fields.update(_mamba_fields(state, dim))
    num_patches = state["pos_embed"].shape[1] - prefix
    fields.update(_input_geometry(family, num_patches, patch, meta, source_stride, name))
    return EncoderConfig.from_dict({"family": family, "embed_dim": dim, **fields, **overrides})


def _mamba_fields(state: Mapping[str, Tensor], dim: int) -> dict[str, Any]:
    mixer = "layers.0.mixer."
    if mixer + "conv1d_b.weight" in state:
        bimamba = "v2"
    elif mixer + "A_b_log" in state:
        bimamba = "v1"
    else:
        bimamba = "none"
    dt_rank = state[mixer + "dt_proj.weight"].shape[1]
    return {
        "norm": "layer" if "layers.0.norm.bias" in state else "rms",
        "bimamba": bimamba,
        "d_state": state[mixer + "A_log"].shape[1],
        "d_conv": state[mixer + "conv1d.weight"].shape[-1],
        "expand": state[mixer + "in_proj.weight"].shape[0] // (2 * dim),
        "dt_rank": None if dt_rank == math.ceil(dim / 16) else dt_rank,
    }


def _input_geometry(
    family: str,
    num_patches: int,
    patch: tuple[int, int],
    meta: Mapping[str, Tensor],
    source_stride: tuple[int, int] | int | None,
    name: str,
) -> dict[str, Any]:
    """num_mel_bins, input_frames and stride that give the checkpoint's `num_patches`."""
    if source_stride is None and "p_input_tdim" not in meta and family != "aum":
        # SSL files record their geometry; without it this is a fine-tuned file, and those
        # use overlapping strides (10 in every official recipe) that the shapes cannot reveal.
        raise CheckpointError(
            f"{name}: no p_input_tdim, so a fine-tuned {family} file whose patch stride the "
            f"tensors cannot tell: pass source_stride= (e.g. 10, the official recipes' value)"
        )
    stride = patch if source_stride is None else source_stride
    stride = (stride, stride) if isinstance(stride, int) else tuple(stride)
    mel_bins = int(meta["p_input_fdim"]) if "p_input_fdim" in meta else 128
    freq = patch_grid((mel_bins, patch[1]), patch, stride)[0]
    if "p_input_tdim" in meta:
        frames = int(meta["p_input_tdim"])
    elif num_patches % freq == 0:
        shortest = (num_patches // freq - 1) * stride[1] + patch[1]
        lengths = range(shortest, shortest + stride[1])  # all give the same time patches
        frames = next((n for n in lengths if n % 16 == 0), shortest)
    else:
        frames = -1
    if frames < patch[1] or math.prod(patch_grid((mel_bins, frames), patch, stride)) != num_patches:
        raise CheckpointError(
            f"{name}: pos_embed holds {num_patches} patches, which no input length gives with "
            f"{mel_bins} mel bins, patch {patch} and stride {stride}; pass source_stride= "
            f"(the stride the checkpoint was trained with)"
        )
    return {"num_mel_bins": mel_bins, "input_frames": frames, "stride": stride}
