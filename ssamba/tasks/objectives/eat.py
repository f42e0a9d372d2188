"""Teacher-student pretraining (data2vec 2.0 / EAT): regress an EMA teacher's features.

    teacher (EMA of the student, no gradients) <- the whole clip
        -> top-K layer outputs, each instance-normalised over the tokens, averaged
        -> frame targets (B, Np, D); utterance target = their mean over patches (B, D)
    student <- `clones` inverse-block-masked copies of each clip (one teacher pass
        serves them all): visible patches come in blocks, the rest is masked
        -> light 2D-conv decoder over the patch grid -> predictions (B * clones, Np, D)
    loss = MSE(predictions, targets) at masked patches
         + utterance_weight * MSE(student's cls token(s), utterance target)

The teacher follows the student after every optimizer step:
`teacher <- decay * teacher + (1 - decay) * student`, with `decay` annealed linearly from
`ema_decay` to `ema_end_decay` over `ema_anneal_steps` steps (then held). Its weights
are buffers-like parameters without gradients inside the LightningModule, so they are
in every checkpoint and a resumed run continues with them.

Shapes: fbank (batch, frames, mel_bins); masks (batch * clones, num_patches) bool, clip-
major (rows i * clones .. i * clones + clones - 1 belong to clip i).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssamba.models.encoder import AudioEncoder, mean_of_patches
from ssamba.tasks.masking import make_mask

__all__ = ["EATConfig", "EATObjective", "EATOutput", "ema_decay_at", "inverse_block_mask"]


@dataclass
class EATConfig:
    """Settings of the teacher-student objective (`model.objective` of a pretraining recipe).

    top_k: teacher layers averaged into the targets (the last K blocks, or layer pairs
        for SSAMBA's paired layers); clipped to the encoder's depth.
    clones: masked copies of each clip per step (EAT: 16), all served by one teacher pass.
    mask_ratio: share of patches masked in each copy (EAT: 0.8).
    block: side of the visible blocks (inverse block masking), in patches.
    decoder_layers / decoder_kernel: the light decoder (conv + LayerNorm + GELU, residual).
    utterance_weight: weight of the cls-token utterance loss (EAT: 1).
    ema_decay -> ema_end_decay over ema_anneal_steps: the teacher's decay schedule.
    """

    top_k: int = 8
    clones: int = 4
    mask_ratio: float = 0.8
    block: int = 2
    decoder_layers: int = 2
    decoder_kernel: int = 3
    utterance_weight: float = 1.0
    ema_decay: float = 0.999
    ema_end_decay: float = 0.9999
    ema_anneal_steps: int = 10000

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ValueError(f"model.objective.mask_ratio={self.mask_ratio}: a share in (0, 1)")
        if self.clones < 1 or self.top_k < 1 or self.block < 1:
            raise ValueError(
                f"model.objective: clones, top_k and block must be >= 1 (got {self.clones}, "
                f"{self.top_k}, {self.block})"
            )
        for name in ("ema_decay", "ema_end_decay"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"model.objective.{name}={getattr(self, name)}: a value in [0, 1]")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EATOutput:
    """One evaluation of the objective (scalars, and the first copy's mask)."""

    loss: Tensor
    frame: Tensor
    utterance: Tensor
    mask: Tensor  # (num_patches,) bool, first copy of the first clip


def ema_decay_at(cfg: EATConfig, step: int) -> float:
    """The teacher's decay at optimizer step `step`: linear from start to end, then held."""
    if cfg.ema_anneal_steps <= 0 or step >= cfg.ema_anneal_steps:
        return cfg.ema_end_decay
    return cfg.ema_decay + (cfg.ema_end_decay - cfg.ema_decay) * step / cfg.ema_anneal_steps


def inverse_block_mask(
    batch: int,
    clones: int,
    grid: tuple[int, int],
    mask_ratio: float,
    block: int,
    generator: torch.Generator | Sequence[torch.Generator],
    device: torch.device | str | None = None,
) -> Tensor:
    """(batch * clones, Np) bool, True = masked: the complement of blocks of visible patches.

    The visible patches (exactly `round(Np * (1 - mask_ratio))`, at least 1) are drawn as
    `block x block` squares by the MSPM block sampler, so what stays visible is a few
    contiguous regions and the masked part cannot be filled in from adjacent patches.
    Per-clip generators give each clip its clones' masks independently of the batch.
    """
    num_patches = grid[0] * grid[1]
    visible = max(1, round(num_patches * (1.0 - mask_ratio)))
    if isinstance(generator, torch.Generator):
        shown = make_mask(batch * clones, grid, visible, (block,), generator, device)
    else:
        shown = torch.cat([make_mask(clones, grid, visible, (block,), g) for g in generator])
        shown = shown.to(device) if device is not None else shown
    return ~shown


def layer_average(layers: Sequence[Tensor], top_k: int) -> Tensor:
    """Average of the last `top_k` layers, each instance-normalised over its tokens.

    layers: each (batch, tokens, dim) -> (batch, tokens, dim).
    """
    chosen = layers[-min(top_k, len(layers)) :]
    normed = [F.instance_norm(x.float().transpose(1, 2)).transpose(1, 2) for x in chosen]
    return torch.stack(normed).mean(0)


class GridDecoder(nn.Module):
    """Light decoder over the patch grid: residual (conv 2D -> LayerNorm -> GELU) blocks.

    tokens (batch, Np, dim), frequency-major -> predictions (batch, Np, dim).
    """

    def __init__(self, dim: int, grid: tuple[int, int], layers: int, kernel: int) -> None:
        super().__init__()
        self.grid = grid
        self.convs = nn.ModuleList(
            nn.Conv2d(dim, dim, kernel, padding=kernel // 2) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))
        self.proj = nn.Linear(dim, dim)

    def forward(self, tokens: Tensor) -> Tensor:
        batch, _, dim = tokens.shape
        x = tokens
        for conv, norm in zip(self.convs, self.norms, strict=True):
            image = x.transpose(1, 2).reshape(batch, dim, *self.grid)
            x = x + F.gelu(norm(conv(image).flatten(2).transpose(1, 2)))
        return self.proj(x)


class EATObjective(nn.Module):
    """Teacher, decoder and loss of the teacher-student objective around a student encoder.

    The student is not a submodule here (the task owns it as `encoder`); the teacher is a
    frozen copy made at construction and moved by `update_teacher`.
    """

    def __init__(self, student: AudioEncoder, cfg: EATConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.teacher.eval()
        self.decoder = GridDecoder(
            student.embed_dim, student.grid, cfg.decoder_layers, cfg.decoder_kernel
        )

    def train(self, mode: bool = True) -> EATObjective:
        """The decoder trains; the teacher always runs in eval mode (no drop path)."""
        super().train(mode)
        self.teacher.eval()
        return self

    @torch.no_grad()
    def targets(self, fbank: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher targets of the whole clips: frames (B, Np, D), utterance (B, D)."""
        layers = self.teacher.forward_features(fbank, return_layers=True)
        patches = [self.teacher.patch_tokens(x) for x in layers]
        frames = layer_average(patches, self.cfg.top_k)
        return frames, mean_of_patches(frames)

    @torch.no_grad()
    def update_teacher(self, student: AudioEncoder, step: int) -> float:
        """teacher <- d * teacher + (1 - d) * student (parameters; buffers copied); returns d."""
        decay = ema_decay_at(self.cfg, step)
        teacher_params = dict(self.teacher.named_parameters())
        for name, param in student.named_parameters():
            teacher_params[name].mul_(decay).add_(param.detach(), alpha=1.0 - decay)
        teacher_buffers = dict(self.teacher.named_buffers())
        for name, buffer in student.named_buffers():
            teacher_buffers[name].copy_(buffer)
        return decay

    def forward(
        self,
        student: AudioEncoder,
        fbank: Tensor,
        generator: torch.Generator | Sequence[torch.Generator],
        clean: Tensor | None = None,
    ) -> EATOutput:
        """The loss on one batch; fbank: (B, T, F), what the student reads.

        clean: (B, T, F), the same clips before augmentation (`data.augment.clean_targets`),
        which the teacher then reads instead of `fbank`.
        """
        cfg = self.cfg
        batch, clones = fbank.shape[0], cfg.clones
        frames, utterance = self.targets(fbank if clean is None else clean)
        mask = inverse_block_mask(
            batch, clones, student.grid, cfg.mask_ratio, cfg.block, generator, fbank.device
        )
        copies = fbank.repeat_interleave(clones, dim=0)
        tokens = student.forward_features(copies, mask=mask)
        predictions = self.decoder(student.patch_tokens(tokens))
        targets = frames.repeat_interleave(clones, dim=0)
        frame_loss = F.mse_loss(predictions[mask].float(), targets[mask])
        cls = student.pool(tokens, "cls")
        utterance_loss = F.mse_loss(cls.float(), utterance.repeat_interleave(clones, dim=0))
        loss = frame_loss + cfg.utterance_weight * utterance_loss
        return EATOutput(loss, frame_loss, utterance_loss, mask[0])
