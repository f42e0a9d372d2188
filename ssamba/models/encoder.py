"""AudioEncoder: one encoder API for the SSAMBA, SSAST and AuM families.

Every family shares the front end and the read-out:

    fbank (B, T, F) -> (B, 1, F, T) -> patch_embed (Conv2d, frequency-major tokens)
        -> masked patches replaced by mask_embed
        -> [cls (, dist)] + patches, + pos_embed (prefix tokens first)
        -> (AuM: cls moved to the middle)
        -> block stack -> final norm -> tokens (B, prefix + patches, D)
        -> patch_tokens / pool("mean" | "cls")

and only the block stack differs: SSAMBA and AuM stack `MambaBlock`s ("Add -> Norm ->
Mixer", `layers.{i}`, `norm_f`), SSAST stacks ViT blocks (`blocks.{i}`, `norm`).
Submodule names match the official checkpoints (see `ssamba.models.checkpoints`).

Defaults are faithful to the originals (docs/originals.md#encoder), quirks included: SSAMBA's
paired layers with flipped residuals (`bidirectional_pairs`) and its double final norm
(`double_final_norm`), both configurable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ssamba.configs import dataclass_from_dict
from ssamba.models.adapters import AdapterConfig, attach_adapters, remove_adapters
from ssamba.models.layers import DropPath, NormKind, linspace_rates, make_norm
from ssamba.models.mamba import BIMAMBA_TYPES, BimambaType, MambaBlock, MambaMixer
from ssamba.models.patching import PatchEmbed, patch_grid, resize_pos_grid, unfold_patches
from ssamba.models.transformer import ATTENTION_IMPLS, AttentionImpl, TransformerBlock

Family = Literal["ssamba", "ssast", "aum"]
FAMILIES = ("ssamba", "ssast", "aum")
Pooling = Literal["mean", "cls", "stats", "band-stats"]
# The published sizes: Vim/SSAMBA/AuM use DeiT's widths.
SIZES = {"tiny": 192, "small": 384, "base": 768}


def mean_of_patches(patches: Tensor, keep: Tensor | None = None) -> Tensor:
    """(batch, num_patches, dim) -> (batch, dim): the mean over every patch, or over those
    `keep` (batch, num_patches) bool marks (e.g. `AudioEncoder.clip_patches`)."""
    if keep is None:
        return patches.mean(dim=1)
    weight = keep.to(patches.dtype).unsqueeze(-1)  # (batch, num_patches, 1)
    return (patches * weight).sum(dim=1) / weight.sum(dim=1).clamp(min=1)


def stats_of_patches(patches: Tensor, keep: Tensor | None = None) -> Tensor:
    """(batch, num_patches, dim) -> (batch, 2 * dim): mean and standard deviation over the
    patches (or those `keep` marks) side by side: statistics pooling, as x-vectors pool
    frames. The deviation keeps what a mean averages away (how much a feature varies
    over the clip), which a filterbank's per-bin statistics show matters for short clips."""
    mean = mean_of_patches(patches, keep)
    spread = mean_of_patches((patches - mean.unsqueeze(1)).square(), keep)
    # the floor keeps sqrt's gradient finite for a clip of one patch (zero spread)
    return torch.cat([mean, spread.clamp(min=1e-8).sqrt()], dim=-1)


@dataclass
class EncoderConfig:
    """Everything needed to rebuild an encoder; a recipe's `model.encoder`, saved in encoder files.

    A field left `None` takes its family's published value when the config is built
    (`FAMILY_DEFAULTS`), so `{family: ssast, embed_dim: 384}` is SSAST-small and a saved
    config always holds concrete values. Widths: tiny 192, small 384, base 768.

    Shared: `patch`/`stride` are (freq, time) in bins/frames; `prefix_tokens` is 1 (cls)
    or 2 (cls + DeiT's dist token); `cls_position` "front" (SSAMBA, SSAST) or "middle"
    (AuM: after the first num_patches // 2 patches). `double_final_norm` applies the
    final norm twice, as SSAMBA does in every path.
    Mamba families: `bimamba` none|v1|v2 and `divide_out` configure the mixer (see
    `ssamba.models.mamba`); `bidirectional_pairs` is Vim's `if_bidirectional`: layers
    2i and 2i+1 form a pair, 2i+1 reads the time-flipped sequence and residual, and the
    pair's outputs and residuals are summed. Drop path: layer i gets
    ([0] + linspace(0, rate, depth))[i] and a final DropPath(rate) precedes the norm.
    Transformer family: `num_heads` (default width / 64, as DeiT), `mlp_ratio`,
    `qkv_bias`, `attention` (sdpa|naive|fta: factorized time/frequency attention, see
    `ssamba.models.transformer`); drop path linspace(0, rate, depth) per block.
    """

    family: Family = "ssamba"
    embed_dim: int = 192
    depth: int | None = None
    num_mel_bins: int = 128
    input_frames: int = 1024
    patch: tuple[int, int] = (16, 16)
    stride: tuple[int, int] | None = None  # None: the patch size (no overlap)
    prefix_tokens: int | None = None
    cls_position: Literal["front", "middle"] | None = None
    norm: NormKind | None = None
    norm_eps: float | None = None
    drop_path_rate: float | None = None
    double_final_norm: bool | None = None
    # Mamba families (ssamba, aum)
    bimamba: BimambaType | None = None  # None: v2 ("Bi-Bi") for ssamba, v1 ("Fo-Bi") for aum
    divide_out: bool | None = None  # None: halve the two directions except for v1
    bidirectional_pairs: bool | None = None
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), as Mamba
    # transformer family (ssast)
    num_heads: int | None = None
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    attention: AttentionImpl = "sdpa"

    def __post_init__(self) -> None:
        _check_choice("family", self.family, FAMILIES)
        for name, value in FAMILY_DEFAULTS[self.family].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.divide_out is None:
            # upstream's fused v1 kernel sums the two directions without halving
            self.divide_out = self.bimamba != "v1"
        if self.num_heads is None:
            self.num_heads = max(1, self.embed_dim // 64)
        # YAML and JSON give lists; the config compares and hashes as tuples.
        self.patch = _pair("patch", self.patch)
        self.stride = self.patch if self.stride is None else _pair("stride", self.stride)
        self._validate()

    def _validate(self) -> None:
        _check_choice("cls_position", self.cls_position, ("front", "middle"))
        _check_choice("norm", self.norm, ("layer", "rms"))
        _check_choice("bimamba", self.bimamba, BIMAMBA_TYPES)
        _check_choice("attention", self.attention, ATTENTION_IMPLS)
        _check_choice("prefix_tokens", self.prefix_tokens, (1, 2))
        for name in ("embed_dim", "depth", "num_mel_bins", "input_frames", "d_state", "d_conv"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EncoderConfig.{name}: must be >= 1, got {getattr(self, name)}")
        if self.num_mel_bins < self.patch[0] or self.input_frames < self.patch[1]:
            raise ValueError(
                f"EncoderConfig.patch={self.patch} does not fit the input "
                f"(num_mel_bins={self.num_mel_bins}, input_frames={self.input_frames})"
            )
        if self.family != "ssast" and self.bidirectional_pairs and self.depth % 2:
            raise ValueError(
                f"EncoderConfig.depth={self.depth}: bidirectional_pairs needs an even depth"
            )
        if self.family == "ssast" and self.norm != "layer":
            raise ValueError("EncoderConfig.norm: the ssast family uses LayerNorm ('layer')")
        if self.family == "ssast" and self.embed_dim % self.num_heads:
            raise ValueError(
                f"EncoderConfig.num_heads={self.num_heads} must divide embed_dim={self.embed_dim}"
            )
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(
                f"EncoderConfig.drop_path_rate: must be in [0, 1), got {self.drop_path_rate}"
            )

    @property
    def grid(self) -> tuple[int, int]:
        """(freq_patches, time_patches) of the patch grid."""
        return patch_grid((self.num_mel_bins, self.input_frames), self.patch, self.stride)

    @property
    def num_layers(self) -> int:
        """Entries of `AudioEncoder.forward_features(return_layers=True)`: blocks or block pairs."""
        paired = self.family != "ssast" and self.bidirectional_pairs
        return self.depth // 2 if paired else self.depth

    @classmethod
    def preset(cls, family: str, size: str, **overrides: Any) -> EncoderConfig:
        """A published size (tiny|small|base = width 192|384|768) of `family`, plus overrides."""
        if size not in SIZES:
            raise ValueError(f"size: expected one of {tuple(SIZES)}, got {size!r}")
        return cls.from_dict({"family": family, "embed_dim": SIZES[size], **overrides})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EncoderConfig:
        """Build from a plain mapping (YAML, a saved file); unknown keys are an error naming them."""
        return dataclass_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def architecture_differences(self, other: EncoderConfig) -> list[str]:
        """Fields that make the weights of `self` and `other` incompatible, as "name a != b".

        Input length, stride and the training-time settings (drop path, attention kernel)
        may differ: an encoder is re-targeted to them (`AudioEncoder.resize_input`).
        """
        free = {"input_frames", "stride", "drop_path_rate", "attention"}
        return [
            f"{f.name} {getattr(self, f.name)!r} != {getattr(other, f.name)!r}"
            for f in fields(self)
            if f.name not in free and getattr(self, f.name) != getattr(other, f.name)
        ]


# The published value of every field a config leaves None, per family (docs/originals.md):
# SSAMBA is Vim's bidirectional layout with flipped pairs, 1 cls first, LayerNorm, drop
# path 0.1 and its double final norm; SSAST is DeiT (12 blocks, cls + dist, LayerNorm
# 1e-6); AuM is unpaired RMSNorm Mamba with the cls token in the middle, "Fo-Bi" (bimamba
# v1) as AuM's run.py default and its released from-scratch checkpoints.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "ssamba": {
        "bimamba": "v2",
        "depth": 24,
        "prefix_tokens": 1,
        "cls_position": "front",
        "norm": "layer",
        "norm_eps": 1e-5,
        "drop_path_rate": 0.1,
        "double_final_norm": True,
        "bidirectional_pairs": True,
    },
    "ssast": {
        "bimamba": "v2",
        "depth": 12,
        "prefix_tokens": 2,
        "cls_position": "front",
        "norm": "layer",
        "norm_eps": 1e-6,
        "drop_path_rate": 0.0,
        "double_final_norm": False,
        "bidirectional_pairs": False,
    },
    "aum": {
        "bimamba": "v1",
        "depth": 24,
        "prefix_tokens": 1,
        "cls_position": "middle",
        "norm": "rms",
        "norm_eps": 1e-5,
        "drop_path_rate": 0.0,
        "double_final_norm": False,
        "bidirectional_pairs": False,
    },
}


def _pair(name: str, value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    pair = tuple(int(v) for v in value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(
            f"EncoderConfig.{name}: expected two positive ints (freq, time), got {value!r}"
        )
    return pair


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"EncoderConfig.{name}: expected one of {choices}, got {value!r}")


class AudioEncoder(nn.Module):
    """Spectrogram-patch encoder; see the module docstring for the data flow.

    fbank: (batch, input_frames, num_mel_bins), normalised as in `ssamba.features`.
    Tokens: (batch, prefix_tokens + num_patches, embed_dim).
    """

    def __init__(self, cfg: EncoderConfig) -> None:
        super().__init__()
        self.cfg = cfg
        dim = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg.patch, cfg.stride, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.prefix_tokens == 2:
            self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.prefix_tokens + self.num_patches, dim))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        if cfg.family == "ssast":
            self._build_transformer_stack()
        else:
            self._build_mamba_stack()
        for token in self._prefix_params():
            nn.init.trunc_normal_(token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.xavier_normal_(self.mask_embed)

    def _build_mamba_stack(self) -> None:
        cfg = self.cfg
        rates = [0.0, *linspace_rates(cfg.drop_path_rate, cfg.depth)][: cfg.depth]
        self.layers = nn.ModuleList(
            MambaBlock(
                MambaMixer(
                    cfg.embed_dim,
                    d_state=cfg.d_state,
                    d_conv=cfg.d_conv,
                    expand=cfg.expand,
                    dt_rank=cfg.dt_rank,
                    bimamba=cfg.bimamba,
                    divide_out=cfg.divide_out,
                    n_residual_layers=cfg.depth,
                ),
                make_norm(cfg.norm, cfg.embed_dim, cfg.norm_eps),
                drop_path=rate,
            )
            for rate in rates
        )
        self.drop_path = DropPath(cfg.drop_path_rate)
        self.norm_f = make_norm(cfg.norm, cfg.embed_dim, cfg.norm_eps)

    def _build_transformer_stack(self) -> None:
        cfg = self.cfg
        self.blocks = nn.ModuleList(
            TransformerBlock(
                cfg.embed_dim,
                cfg.num_heads,
                mlp_ratio=cfg.mlp_ratio,
                qkv_bias=cfg.qkv_bias,
                norm_eps=cfg.norm_eps,
                drop_path=rate,
                attention=cfg.attention,
            )
            for rate in linspace_rates(cfg.drop_path_rate, cfg.depth)
        )
        self.norm = make_norm(cfg.norm, cfg.embed_dim, cfg.norm_eps)

    # ------------------------------------------------------------------ geometry
    @property
    def grid(self) -> tuple[int, int]:
        """(freq_patches, time_patches)."""
        return self.cfg.grid

    @property
    def num_patches(self) -> int:
        f, t = self.grid
        return f * t

    @property
    def embed_dim(self) -> int:
        return self.cfg.embed_dim

    @property
    def patch_dim(self) -> int:
        """Values per raw input patch (patch_freq * patch_time): the size of MSPM targets."""
        return self.cfg.patch[0] * self.cfg.patch[1]

    @property
    def prefix_start(self) -> int:
        """Index of the first prefix (cls) token in the token sequence."""
        return self.num_patches // 2 if self.cfg.cls_position == "middle" else 0

    # ------------------------------------------------------------------ forward
    def forward_features(
        self, fbank: Tensor, mask: Tensor | None = None, return_layers: bool = False
    ) -> Tensor | list[Tensor]:
        """Encode; fbank: (batch, frames, mel_bins), mask: bool (batch, num_patches), True = masked.

        Returns tokens (batch, prefix + num_patches, dim) after the final norm, or with
        `return_layers` one such tensor per block (per layer pair when paired): the
        residual stream after that block, except the last entry, which is the final
        normalised output (equal to the plain call).
        """
        tokens = self._embed(fbank, mask)
        if self.cfg.family == "ssast":
            return self._run_transformer(tokens, return_layers)
        return self._run_mamba(tokens, return_layers)

    def forward(self, fbank: Tensor, pool: Pooling = "mean") -> Tensor:
        """Clip embedding: fbank (batch, frames, mel_bins) -> (batch, dim)."""
        return self.pool(self.forward_features(fbank), pool)

    def patch_tokens(self, tokens: Tensor) -> Tensor:
        """(batch, prefix + num_patches, dim) -> (batch, num_patches, dim), prefix removed."""
        start, end = self.prefix_start, self.prefix_start + self.cfg.prefix_tokens
        if start == 0:
            return tokens[:, end:]
        return torch.cat([tokens[:, :start], tokens[:, end:]], dim=1)

    def pool(self, tokens: Tensor, how: Pooling = "mean", keep: Tensor | None = None) -> Tensor:
        """(batch, tokens, dim) -> (batch, pooled_dim(how)).

        "mean": average of the patch tokens (SSAMBA/SSAST `ft_avgtok`), or with `keep`
        (batch, num_patches) bool, of the kept ones only (`clip_patches`: padding left
        out); "stats": their mean and standard deviation side by side (2 * dim), with
        `keep` likewise; "band-stats": "stats" of each frequency band's tokens over time,
        the bands side by side, lowest first (2 * bands * dim: averaging over bands loses
        which band holds what, which a filterbank's per-bin statistics keep); "cls": the
        prefix token, or the average of cls and dist for SSAST (its `ft_cls`).
        """
        if how == "mean":
            return mean_of_patches(self.patch_tokens(tokens), keep)
        if how == "stats":
            return stats_of_patches(self.patch_tokens(tokens), keep)
        if how == "band-stats":
            bands, steps = self.grid
            grid = self.patch_tokens(tokens).unflatten(1, (bands, steps))  # frequency-major
            rows = grid.flatten(0, 1)  # (batch * bands, steps, dim)
            keep = None if keep is None else keep.unflatten(1, (bands, steps)).flatten(0, 1)
            return stats_of_patches(rows, keep).view(len(tokens), -1)
        if how == "cls":
            start = self.prefix_start
            return tokens[:, start : start + self.cfg.prefix_tokens].mean(dim=1)
        raise ValueError(f"pool: expected 'mean', 'stats', 'band-stats' or 'cls', got {how!r}")

    def pooled_dim(self, how: Pooling = "mean") -> int:
        """Width of `pool(tokens, how)`: the embedding width, twice it for "stats",
        2 * frequency bands times it for "band-stats"."""
        if how == "band-stats":
            return 2 * self.grid[0] * self.embed_dim
        return 2 * self.embed_dim if how == "stats" else self.embed_dim

    def clip_columns(self, frames: Tensor) -> Tensor:
        """Time columns of the patch grid that hold a clip's own frames: (batch,) -> (batch,) long.

        A column counts when its time span starts before `frames` (a partly padded column
        included, so every clip keeps at least its first one); the rest is padding.
        """
        step = self.cfg.stride[1]
        return ((frames + step - 1) // step).clamp(1, self.grid[1])

    def clip_patches(self, frames: Tensor) -> Tensor:
        """Patches in the clip's own columns: frames (batch,) long -> (batch, num_patches) bool.

        Frequency-major token order, as everywhere: True where the column holds clip frames.
        """
        grid_f, grid_t = self.grid
        columns = torch.arange(grid_t, device=frames.device)
        in_clip = columns[None, :] < self.clip_columns(frames)[:, None]  # (batch, grid_t)
        return in_clip[:, None, :].expand(-1, grid_f, -1).reshape(len(frames), -1)

    def unfold_patches(self, fbank: Tensor) -> Tensor:
        """Raw input patches in token order: (batch, frames, mel_bins) -> (batch, num_patches, patch_dim)."""
        self._check_fbank(fbank)
        return unfold_patches(fbank.transpose(1, 2).unsqueeze(1), self.cfg.patch, self.cfg.stride)

    # ------------------------------------------------------------------ fine-tuning geometry
    def resize_input(
        self, input_frames: int | None = None, stride: tuple[int, int] | int | None = None
    ) -> AudioEncoder:
        """Re-target the encoder to another input length and/or patch stride, in place.

        The patch projection keeps its weights (only its stride changes); the position
        embedding of the patch grid is cropped around the centre or bilinearly stretched
        as SSAST/SSAMBA do, or resampled with antialiasing for AuM as AuM does
        (`ssamba.models.patching.resize_pos_grid`); prefix tokens keep theirs. Call it
        before creating the optimizer: pos_embed becomes a new Parameter when the grid
        changes. Returns self.
        """
        cfg = replace(
            self.cfg,
            input_frames=self.cfg.input_frames if input_frames is None else input_frames,
            stride=self.cfg.stride if stride is None else stride,
        )
        old_grid, new_grid = self.grid, cfg.grid
        self.patch_embed.proj.stride = cfg.stride
        if new_grid != old_grid:
            prefix = self.cfg.prefix_tokens
            with torch.no_grad():
                grid_pos = resize_pos_grid(
                    self.pos_embed[:, prefix:], old_grid, new_grid, antialias=cfg.family == "aum"
                )
                pos = torch.cat([self.pos_embed[:, :prefix], grid_pos], dim=1)
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        self.cfg = cfg
        return self

    # ------------------------------------------------------------------ parameter-efficient tuning
    def add_adapters(self, spec: AdapterConfig) -> nn.ModuleDict:
        """Attach the adapters or LoRA of `spec` (`ssamba.models.adapters`), kept in
        `self.adapters`; base parameter names do not change. Returns the adapters."""
        return attach_adapters(self, spec)

    def remove_adapters(self) -> None:
        """Detach everything `add_adapters` attached."""
        remove_adapters(self)

    # ------------------------------------------------------------------ internals
    def _prefix_params(self) -> list[nn.Parameter]:
        return [self.cls_token] + ([self.dist_token] if self.cfg.prefix_tokens == 2 else [])

    def _check_fbank(self, fbank: Tensor) -> None:
        expected = (self.cfg.input_frames, self.cfg.num_mel_bins)
        if fbank.dim() != 3 or tuple(fbank.shape[1:]) != expected:
            raise ValueError(
                f"fbank: expected (batch, frames={expected[0]}, mel_bins={expected[1]}), "
                f"got {tuple(fbank.shape)}; pad/crop the features or call "
                f"encoder.resize_input(input_frames=...) for another length"
            )

    def _embed(self, fbank: Tensor, mask: Tensor | None) -> Tensor:
        """Patch embedding, mask substitution, prefix tokens and positions: (B, P + Np, D)."""
        self._check_fbank(fbank)
        patches = self.patch_embed(fbank.transpose(1, 2).unsqueeze(1))  # (B, Np, D)
        batch = patches.shape[0]
        if mask is not None:
            if mask.shape != (batch, self.num_patches) or mask.dtype != torch.bool:
                raise ValueError(
                    f"mask: expected bool (batch={batch}, num_patches={self.num_patches}), "
                    f"got {mask.dtype} {tuple(mask.shape)}"
                )
            patches = torch.where(mask.unsqueeze(-1), self.mask_embed.to(patches.dtype), patches)
        prefix = [t.expand(batch, -1, -1) for t in self._prefix_params()]
        tokens = torch.cat([*prefix, patches], dim=1) + self.pos_embed
        start = self.prefix_start
        if start:  # move the prefix (with its position embedding) to the middle (AuM)
            p = self.cfg.prefix_tokens
            tokens = torch.cat([tokens[:, p : p + start], tokens[:, :p], tokens[:, p + start :]], 1)
        return tokens

    def _run_mamba(self, hidden: Tensor, collect: bool) -> Tensor | list[Tensor]:
        """Mamba stack, then residual + drop_path(hidden) -> norm_f (-> norm_f again)."""
        residual: Tensor | None = None
        outputs: list[Tensor] = []
        if self.cfg.bidirectional_pairs:
            for fwd, bwd in zip(self.layers[0::2], self.layers[1::2], strict=True):
                hidden_f, residual_f = fwd(hidden, residual)
                # bwd reads the time-flipped sequence and residual; `reverse` computes it
                # with its outputs flipped back, without materialising the three flips
                hidden_b, residual_b = bwd(hidden, residual, reverse=True)
                hidden, residual = hidden_f + hidden_b, residual_f + residual_b
                if collect:
                    outputs.append(residual + hidden)
        else:
            for layer in self.layers:
                hidden, residual = layer(hidden, residual)
                if collect:
                    outputs.append(residual + hidden)
        return self._final_norm(self.norm_f, residual + self.drop_path(hidden), outputs, collect)

    def _run_transformer(self, x: Tensor, collect: bool) -> Tensor | list[Tensor]:
        outputs: list[Tensor] = []
        # FTA attends within rows and columns of the patch grid: blocks need its shape.
        grid = (self.grid, self.cfg.prefix_tokens, self.prefix_start)
        for block in self.blocks:
            x = block(x, grid) if self.cfg.attention == "fta" else block(x)
            if collect:
                outputs.append(x)
        return self._final_norm(self.norm, x, outputs, collect)

    def _final_norm(
        self, norm: nn.Module, x: Tensor, outputs: list[Tensor], collect: bool
    ) -> Tensor | list[Tensor]:
        """norm(x) (twice with double_final_norm); with `collect`, it replaces the last block output."""
        out = norm(x)
        if self.cfg.double_final_norm:
            out = norm(out)
        return [*outputs[:-1], out] if collect else out
