"""Parameter-efficient tuning: adapters and LoRA for every encoder family, and adapter files.

`AudioEncoder.add_adapters(AdapterConfig(...))` is the one way in. It attaches small
trainable modules, held in `encoder.adapters` (a ModuleDict keyed by the site's module
path with "." -> "_"), and wires them in from the outside, so the base parameters keep
their names (`layers.0.mixer.in_proj.weight`, `blocks.3.attn.qkv.weight`, ...) and
official checkpoints and encoder files still load into the encoder before adapters go on:

- bottleneck (AAT): down (dim -> size) -> GELU -> up (size -> dim), `up` zero-initialised
  and multiplied by a learnable scale (init `scale_init`), so the adapted encoder starts
  equal to the base one;
- conv (TI-CL): the same with a depthwise Conv1d (kernel `kernel_size`, "same" padding)
  over the token sequence inside the bottleneck;
- lora: W x + scale * B(A(x)) on the projections (Mamba mixer in_proj/out_proj; attention
  qkv/proj; with `where: mlp` fc1/fc2), A ~ kaiming, B = 0, rank `size`, fixed scale
  `scale_init` (LoRA's alpha / rank).

Bottleneck and conv adapters sit at a sub-layer, through a forward hook:

    parallel:    out = sublayer(x) + s * adapter(x)     (x: the sub-layer's input)
    sequential:  out = y + s * adapter(y),  y = sublayer(x)

Sub-layers: the Mamba block's mixer (input: the normed residual), the transformer block's
attention (`where: mixer`) and MLP (`where: mlp`). Mamba blocks have no MLP: asking for
one there is an error. LoRA replaces each projection by a `LoRALinear` that holds the very
same Parameters under the same names and exposes `weight` as W + scale * B A, because the
fused Mamba paths read `out_proj.weight` directly instead of calling the module.

An adapter file (`save_adapter_file`) holds only the adapters, the classifier head, the
labels and a reference to its base encoder (path and a sha256 of its weights). The one
loader (`ssamba.models.encoder_file.load_encoder_file`) reads it onto that encoder and
refuses any other. This module imports neither the encoder nor the loader, so the imports
run one way: encoder_file -> encoder -> adapters.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.configs import dataclass_from_dict
from ssamba.files import atomic_path
from ssamba.models.transformer import TransformerBlock

if TYPE_CHECKING:
    from ssamba.models.encoder import AudioEncoder

AdapterKind = Literal["bottleneck", "conv", "lora"]
Placement = Literal["parallel", "sequential"]
Where = Literal["mixer", "mlp", "both"]
FORMAT = "ssamba-adapters"
VERSION = 1


@dataclass
class AdapterConfig:
    """What to insert; a recipe's `model.adapter` section (with `model.mode: adapter`).

    kind: bottleneck | conv | lora. placement: parallel | sequential (bottleneck and conv;
    LoRA is parallel to its projection by construction). size: the bottleneck width, or
    LoRA's rank. where: mixer (Mamba mixer / attention) | mlp (transformer MLP) | both.
    scale_init: initial learnable scale of bottleneck/conv adapters; LoRA's fixed scale.
    kernel_size: the conv adapter's depthwise kernel over tokens (odd).
    """

    kind: AdapterKind = "bottleneck"
    placement: Placement = "parallel"
    size: int = 16
    where: Where = "mixer"
    scale_init: float = 1.0
    kernel_size: int = 3

    def __post_init__(self) -> None:
        for name, choices in (
            ("kind", ("bottleneck", "conv", "lora")),
            ("placement", ("parallel", "sequential")),
            ("where", ("mixer", "mlp", "both")),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"AdapterConfig.{name}: expected one of {choices}, got {getattr(self, name)!r}"
                )
        if self.size < 1:
            raise ValueError(f"AdapterConfig.size: must be >= 1, got {self.size}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"AdapterConfig.kernel_size: must be odd, got {self.kernel_size}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterConfig:
        return dataclass_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- modules
class BottleneckAdapter(nn.Module):
    """s * up(act(down(x))); x: (batch, tokens, dim) -> same. With `conv`, a depthwise
    Conv1d over tokens runs between down and act (TI-CL's convolutional adapter)."""

    def __init__(self, dim: int, size: int, scale_init: float, kernel_size: int | None) -> None:
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.conv = (
            nn.Conv1d(size, size, kernel_size, padding=kernel_size // 2, groups=size)
            if kernel_size
            else None
        )
        self.up = nn.Linear(size, dim)
        self.scale = nn.Parameter(torch.tensor(float(scale_init)))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: Tensor, reverse: bool = False) -> Tensor:
        """`reverse`: x belongs to a time-reversed pass (the conv looks the other way)."""
        h = self.down(x)
        if self.conv is not None:
            h = h.flip(1) if reverse else h
            h = self.conv(h.transpose(1, 2)).transpose(1, 2)
            h = h.flip(1) if reverse else h
        return self.scale * self.up(F.gelu(h))


class LoRA(nn.Module):
    """The low-rank update of one Linear: scale * B A, A: (rank, in), B: (out, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, scale: float) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, in_features))
        self.B = nn.Parameter(torch.zeros(out_features, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scale = scale

    def delta_weight(self) -> Tensor:
        return self.scale * (self.B @ self.A)

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * F.linear(F.linear(x, self.A), self.B)

    def extra_repr(self) -> str:
        return f"rank={self.A.shape[0]}, scale={self.scale}"


class LoRALinear(nn.Module):
    """A Linear with a LoRA update, holding the base Linear's Parameters under its names.

    `weight` reads as W + scale * B A (for code that takes `module.weight`, as the fused
    Mamba paths do); the state dict still holds the base `weight` (and `bias`). The LoRA
    module lives in `encoder.adapters`, not here, so it is no part of the base names.
    """

    def __init__(self, base: nn.Linear, lora: LoRA) -> None:
        super().__init__()
        # Registered directly: `weight` is a property of this class, which would make
        # register_parameter refuse the name.
        self._parameters["weight"] = base.weight
        self._parameters["bias"] = base.bias
        self.in_features, self.out_features = base.in_features, base.out_features
        object.__setattr__(self, "lora", lora)  # not a submodule
        object.__setattr__(self, "base", base)

    @property
    def weight(self) -> Tensor:  # type: ignore[override]
        return self._parameters["weight"] + self.lora.delta_weight()

    @property
    def bias(self) -> Tensor | None:
        return self._parameters["bias"]

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._parameters["weight"], self.bias) + self.lora(x)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.lora.extra_repr()}"


# ---------------------------------------------------------------------------- attaching
def _sublayers(encoder: AudioEncoder, where: Where) -> list[tuple[str, nn.Module]]:
    """(path, module) of every sub-layer an adapter goes beside, in block order."""
    wants_mlp = where in ("mlp", "both")
    if encoder.cfg.family == "ssast":
        sites = []
        for i, block in enumerate(encoder.blocks):
            assert isinstance(block, TransformerBlock)
            if where in ("mixer", "both"):
                sites.append((f"blocks.{i}.attn", block.attn))
            if wants_mlp:
                sites.append((f"blocks.{i}.mlp", block.mlp))
        return sites
    if wants_mlp:
        raise ValueError(
            f"adapter.where={where!r}: the {encoder.cfg.family} family's Mamba blocks have no "
            "MLP sub-layer to adapt; use where: mixer (the ssast family has both)"
        )
    return [(f"layers.{i}.mixer", block.mixer) for i, block in enumerate(encoder.layers)]


def _projections(encoder: AudioEncoder, where: Where) -> list[tuple[str, nn.Module, str]]:
    """(path of the owner, owner, attribute) of every Linear LoRA adapts."""
    names = {
        "mixer": ("in_proj", "out_proj") if encoder.cfg.family != "ssast" else ("qkv", "proj"),
        "mlp": ("fc1", "fc2"),
    }
    return [
        (path, module, name)
        for part in (("mixer", "mlp") if where == "both" else (where,))
        for path, module in _sublayers(encoder, part)
        for name in names[part]
    ]


def attach_adapters(encoder: AudioEncoder, spec: AdapterConfig) -> nn.ModuleDict:
    """Create the adapters of `spec`, keep them in `encoder.adapters`, wire them in.

    Idempotence is not offered: a second call is an error (remove_adapters first).
    """
    if getattr(encoder, "adapters", None) is not None:
        raise ValueError("add_adapters: this encoder already has adapters; remove_adapters first")
    dim = encoder.cfg.embed_dim
    adapters = nn.ModuleDict()
    handles: list[Any] = []
    if spec.kind == "lora":
        for path, owner, name in _projections(encoder, spec.where):
            base = getattr(owner, name)
            lora = LoRA(base.in_features, base.out_features, spec.size, spec.scale_init)
            adapters[_key(f"{path}.{name}")] = lora
            owner._modules[name] = LoRALinear(base, lora)
            handles.append((owner, name, base))
    else:
        kernel = spec.kernel_size if spec.kind == "conv" else None
        for path, sublayer in _sublayers(encoder, spec.where):
            adapter = BottleneckAdapter(dim, spec.size, spec.scale_init, kernel)
            adapters[_key(path)] = adapter
            hook = _parallel_hook if spec.placement == "parallel" else _sequential_hook
            handles.append(sublayer.register_forward_hook(hook(adapter), with_kwargs=True))
    encoder.adapters = adapters
    encoder._adapter_handles = handles
    encoder.adapter_config = spec
    return adapters


def remove_adapters(encoder: AudioEncoder) -> None:
    """Undo `attach_adapters`: hooks removed, projections restored, `encoder.adapters` gone."""
    for handle in getattr(encoder, "_adapter_handles", []):
        if isinstance(handle, tuple):  # LoRA: the base Linear back, with the current tensors
            owner, name, base = handle
            wrapper = owner._modules[name]
            base.weight, base.bias = wrapper._parameters["weight"], wrapper._parameters["bias"]
            owner._modules[name] = base
        else:
            handle.remove()
    for name in ("adapters", "_adapter_handles", "adapter_config"):
        if hasattr(encoder, name):
            delattr(encoder, name)


def _key(path: str) -> str:
    return path.replace(".", "_")


def _parallel_hook(adapter: BottleneckAdapter) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        x = args[0] if args else kwargs["hidden"]
        return out + adapter(x, reverse=bool(kwargs.get("reverse", False)))

    return hook


def _sequential_hook(adapter: BottleneckAdapter) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Tensor) -> Tensor:
        return out + adapter(out, reverse=bool(kwargs.get("reverse", False)))

    return hook


def base_state_dict(encoder: AudioEncoder) -> dict[str, Tensor]:
    """The encoder's own weights, without `adapters.*` (the names of an encoder file)."""
    return {k: v for k, v in encoder.state_dict().items() if not k.startswith("adapters.")}


def weights_sha256(encoder: AudioEncoder) -> str:
    """sha256 over the base weights (names, shapes, float32 bytes), adapters excluded."""
    digest = hashlib.sha256()
    for name, tensor in sorted(base_state_dict(encoder).items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(t.shape)};".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def parameter_counts(encoder: AudioEncoder) -> dict[str, int]:
    """{"encoder": base parameters, "adapters": adapter parameters}."""
    adapters = getattr(encoder, "adapters", None)
    in_adapters = {id(p) for p in adapters.parameters()} if adapters is not None else set()
    base = sum(p.numel() for p in encoder.parameters() if id(p) not in in_adapters)
    return {
        "encoder": base,
        "adapters": sum(p.numel() for p in (adapters or nn.Module()).parameters()),
    }


# ---------------------------------------------------------------------------- files
def save_adapter_file(
    path: str | Path,
    encoder: AudioEncoder,
    head: Mapping[str, Tensor],
    base: Mapping[str, Any],
    labels: list[str] | None = None,
    features: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Write adapters + head + labels + base reference; `base`: {"path", "sha256", "config"}
    (the base encoder's file and weights as loaded, before any resize), `extra`: geometry
    ("input_frames", "stride"), "pooling", "ignore_padding" and "multilabel" needed to
    rebuild the classifier."""
    if getattr(encoder, "adapters", None) is None:
        raise ValueError("save_adapter_file: the encoder has no adapters")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "adapter": encoder.adapter_config.to_dict(),
        "adapters": {k: v.detach().cpu() for k, v in encoder.adapters.state_dict().items()},
        "head": {k: v.detach().cpu() for k, v in head.items()},
        "labels": None if labels is None else list(labels),
        "base": dict(base),
        "features": None if features is None else dict(features),
        "input_frames": encoder.cfg.input_frames,
        "stride": list(encoder.cfg.stride),
        **dict(extra or {}),
    }
    with atomic_path(path) as staged:
        torch.save(payload, staged)
    return path
