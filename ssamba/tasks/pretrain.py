"""Masked spectrogram patch modelling (MSPM): the SSAST/SSAMBA self-supervised objective.

A clip's filterbank is cut into patches; some are replaced by a learned mask embedding
and the encoder must, at every masked position,
- pick out the true input patch among the clip's other masked patches (discriminative,
  InfoNCE through `cpredlayer`), and
- regress the raw patch values (generative, MSE through `gpredlayer`).
The joint loss is `nce_weight * nce + mse_weight * mse` (1 and 10 in the originals), each
term from its own forward pass with its own mask, as the originals do; `single_pass`
computes both on one pass (half the compute, not what the released models saw).

Faithful defaults, documented options (see REFERENCE.md C):
- `nce_axis="original"`: `log_softmax(targets @ preds.T, dim=-1)`, a softmax over the
  predictions, which the released code uses; `"paper"` is equation 1 of the SSAST paper
  (softmax over the candidate targets). ssast#13 discusses the difference.
- raw dot products (`temperature=1`), targets are the normalised input patches, detached.
- accuracy is the originals' "masked acc": for each prediction, is the best-scoring
  target its own patch.

Learning rate: linear warm-up over `warmup_steps`, then either `plateau` (halve when the
validation masked accuracy has not improved for `plateau_patience` evaluations, as the
originals' ReduceLROnPlateau) or `cosine` to `min_lr` at `trainer.max_steps`. The rate of
a step is a pure function of (step, plateau state), which is saved in the checkpoint, so a
resumed run continues with exactly the rate it would have had.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
import yaml
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from ssamba.models.checkpoints import save_encoder
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.tasks.cli_common import YamlPiece, read_yaml_piece
from ssamba.tasks.masking import make_mask

__all__ = [
    "PlateauScale",
    "PretrainTask",
    "build_encoder",
    "encoder_spec",
    "info_nce",
    "no_weight_decay",
]

# The originals validate with 400 of 512 masked patches whatever they train with.
VAL_MASK_FRACTION = 400 / 512
# Clip-weighted sums a validation epoch accumulates (the last is the clip count).
VAL_SUMS = ("loss", "nce", "mse", "acc", "clips")
# Parameters that weight decay would only pull towards zero for no benefit: position and
# special tokens, the SSM's log-decay rates and skip gains.
NO_DECAY_NAMES = {
    "pos_embed",
    "cls_token",
    "dist_token",
    "mask_embed",
    "A_log",
    "A_b_log",
    "D",
    "D_b",
}


def encoder_spec(encoder: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    """`{family, size, **EncoderConfig overrides}` with command-line strings typed.

    `--model.encoder.depth 2` reaches the task as the string "2"; YAML typing makes it 2.
    """
    spec = {**encoder, **{k: v for k, v in overrides.items() if v is not None}}
    return {k: yaml.safe_load(v) if isinstance(v, str) else v for k, v in spec.items()}


def build_encoder(spec: dict[str, Any]) -> AudioEncoder:
    """An `AudioEncoder` from `{"family": ..., "size": ..., **EncoderConfig overrides}`."""
    spec = dict(spec)
    missing = {"family", "size"} - spec.keys()
    if missing:
        raise ValueError(
            f"model.encoder: missing {sorted(missing)} (e.g. family: ssamba, size: tiny)"
        )
    family, size = spec.pop("family"), spec.pop("size")
    try:
        config = EncoderConfig.preset(family, size, **spec)
    except ValueError as error:  # e.g. an override EncoderConfig does not know
        raise ValueError(f"model.encoder: {error}") from error
    return AudioEncoder(config)


def info_nce(
    preds: Tensor, targets: Tensor, axis: Literal["original", "paper"], temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Within-clip InfoNCE between predictions and targets at the masked positions.

    preds, targets: (batch, masked, patch_dim); negatives are the clip's other masked
    patches. Returns (loss, accuracy) as scalars; accuracy counts predictions whose
    best-scoring target (argmax over targets) is their own patch.
    """
    with torch.autocast(preds.device.type, enabled=False):
        scores = targets.float() @ preds.float().transpose(1, 2) / temperature  # (B, M, M) [t, p]
        log_probs = F.log_softmax(scores, dim=-1 if axis == "original" else 1)
        loss = -log_probs.diagonal(dim1=1, dim2=2).mean()
        own = torch.arange(scores.shape[1], device=scores.device)
        accuracy = (scores.argmax(dim=1) == own).float().mean()
    return loss, accuracy


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases, position/special tokens and SSM rates are not decayed."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


@dataclass
class PlateauScale:
    """The learning-rate multiplier of ReduceLROnPlateau(mode="max"), kept as plain state.

    Same rule as torch's: an evaluation improves when it beats the best by a relative
    `threshold`; after more than `patience` evaluations without improvement the scale is
    multiplied by `factor`.
    """

    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-4
    scale: float = 1.0
    best: float = -math.inf
    bad_evals: int = 0

    def step(self, metric: float) -> None:
        if metric > self.best * (1 + self.threshold) if self.best > 0 else metric > self.best:
            self.best, self.bad_evals = metric, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.scale *= self.factor
            self.bad_evals = 0


@dataclass
class MSPMOutput:
    """One MSPM evaluation: losses and the tensors a picture of it needs (first clip)."""

    loss: Tensor
    nce: Tensor
    mse: Tensor
    accuracy: Tensor
    mask: Tensor  # (num_patches,) bool, of the generative pass
    reconstruction: Tensor  # (masked, patch_dim), generative predictions


class PretrainTask(LightningModule):
    """SSAST/SSAMBA masked spectrogram patch modelling around any `AudioEncoder`.

    Batches: `{"fbank": (batch, frames, mel_bins), "id": [...]}`.
    Parameter names: `encoder.*` (exported at the end of fit), `cpredlayer.*` and
    `gpredlayer.*` as in the original checkpoints.
    """

    def __init__(
        self,
        encoder: dict[str, Any] | YamlPiece,
        input_frames: int | None = None,
        n_masked: int = 400,
        n_masked_val: int | None = None,
        cluster_sizes: tuple[int, ...] = (3, 4, 5),
        nce_weight: float = 1.0,
        mse_weight: float = 10.0,
        nce_axis: Literal["original", "paper"] = "original",
        temperature: float = 1.0,
        single_pass: bool = False,
        lr: float = 1e-4,
        weight_decay: float = 5e-8,
        betas: tuple[float, float] = (0.95, 0.999),
        warmup_steps: int = 1000,
        schedule: Literal["plateau", "cosine"] = "plateau",
        plateau_factor: float = 0.5,
        plateau_patience: int = 2,
        min_lr: float = 0.0,
        image_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            encoder: encoder spec `{family, size, **EncoderConfig overrides}`, inline or a
                YAML piece such as `recipes/model/ssamba_tiny.yaml`; on the command line
                `--model.encoder.depth 2` overrides one field of the recipe's piece.
            input_frames: frames per clip; recipes link it to the data's crop length.
            n_masked: patches masked per clip in training (400 of 512 in the originals).
            n_masked_val: patches masked in validation; default 400/512 of the patches.
            image_every_n_steps: log input / mask / reconstruction to TensorBoard (0: never).
            seed: masks are drawn from (seed, rank, step), so runs and resumes repeat them.
        """
        super().__init__()
        spec = encoder_spec(read_yaml_piece(encoder), input_frames=input_frames)
        self.encoder = build_encoder(spec)
        num_patches, dim = self.encoder.num_patches, self.encoder.embed_dim
        n_masked_val = n_masked_val or max(1, round(VAL_MASK_FRACTION * num_patches))
        for key, value in (("n_masked", n_masked), ("n_masked_val", n_masked_val)):
            if not 0 < value <= num_patches:
                raise ValueError(
                    f"model.{key}={value}: the encoder has only {num_patches} patches "
                    f"(grid {tuple(self.encoder.grid)}); choose 1..{num_patches}"
                )
        if temperature <= 0:
            raise ValueError(f"model.temperature={temperature} must be > 0")
        self.save_hyperparameters()
        # Store the resolved spec, so a checkpoint rebuilds without the recipe files.
        self.hparams.encoder = {**spec, "input_frames": self.encoder.cfg.input_frames}
        self.hparams.n_masked_val = n_masked_val
        self.cpredlayer = self._head(dim, self.encoder.patch_dim)
        self.gpredlayer = self._head(dim, self.encoder.patch_dim)
        self.plateau = PlateauScale(plateau_factor, plateau_patience)
        self._val_sums = torch.zeros(len(VAL_SUMS))  # summed over the validation epoch

    @staticmethod
    def _head(dim: int, patch_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, patch_dim))

    # ---- the objective -----------------------------------------------------------------

    def masked_hidden(self, fbank: Tensor, mask: Tensor) -> Tensor:
        """Encoder outputs at the masked patches: (B, T, F), (B, Np) -> (B, masked, D)."""
        patches = self.encoder.patch_tokens(self.encoder.forward_features(fbank, mask=mask))
        return patches[mask].view(fbank.shape[0], -1, patches.shape[-1])

    def mspm(self, fbank: Tensor, n_masked: int, generator: torch.Generator) -> MSPMOutput:
        """Joint discriminative + generative loss on one batch; fbank: (B, T, F)."""
        hp = self.hparams
        batch = fbank.shape[0]
        targets = self.encoder.unfold_patches(fbank).detach()  # (B, Np, patch_dim)

        def draw() -> Tensor:
            return make_mask(
                batch, self.encoder.grid, n_masked, hp.cluster_sizes, generator, fbank.device
            )

        def at(mask: Tensor) -> Tensor:
            return targets[mask].view(batch, n_masked, -1)

        mask = draw()
        hidden = self.masked_hidden(fbank, mask)
        nce, accuracy = info_nce(self.cpredlayer(hidden), at(mask), hp.nce_axis, hp.temperature)
        if not hp.single_pass:
            mask = draw()
            hidden = self.masked_hidden(fbank, mask)
        reconstruction = self.gpredlayer(hidden)
        mse = F.mse_loss(reconstruction.float(), at(mask).float())
        loss = hp.nce_weight * nce + hp.mse_weight * mse
        return MSPMOutput(loss, nce, mse, accuracy, mask[0], reconstruction[0].detach())

    def _generator(self, stream: int, index: int) -> torch.Generator:
        """Masks depend only on (seed, stream, rank, index): repeatable, distinct per rank."""
        seed = hash((self.hparams.seed, stream, self.global_rank, index)) % (2**63)
        return torch.Generator().manual_seed(seed)

    # ---- Lightning hooks ---------------------------------------------------------------

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        lr = self.lr_at(self.global_step)
        for group in self.optimizers().optimizer.param_groups:
            group["lr"] = lr

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        fbank = batch["fbank"]
        out = self.mspm(fbank, self.hparams.n_masked, self._generator(0, self.global_step))
        size = fbank.shape[0]
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        self.log("train/nce", out.nce, batch_size=size)
        self.log("train/mse", out.mse, batch_size=size)
        self.log("train/acc", out.accuracy, prog_bar=True, batch_size=size)
        self.log("train/lr", self.lr_at(self.global_step), batch_size=size)
        skipped = getattr(self.trainer.datamodule, "skipped", None)
        if callable(skipped):  # corrupt clips the data module dropped and counted
            self.log("data/skipped", float(sum(skipped().values())), batch_size=size)
        every = self.hparams.image_every_n_steps
        if every and self.global_step % every == 0 and self.trainer.is_global_zero:
            self._log_picture(fbank[0].detach(), out)
        return out.loss

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(len(VAL_SUMS), device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        fbank = batch["fbank"]
        # The same masks at every evaluation, so accuracies are comparable across steps.
        out = self.mspm(fbank, self.hparams.n_masked_val, self._generator(1, batch_idx))
        clips = fbank.shape[0]
        self._val_sums += torch.stack(
            [
                out.loss.detach() * clips,
                out.nce.detach() * clips,
                out.mse.detach() * clips,
                out.accuracy.detach() * clips,
                out.loss.new_tensor(clips),
            ]
        )

    def on_validation_epoch_end(self) -> None:
        # One all-reduce for every metric: ranks may hold different numbers of validation
        # batches, so nothing may synchronise per batch.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        means = dict(zip(VAL_SUMS, (sums / sums[-1].clamp(min=1)).tolist(), strict=True))
        # Every rank holds the same values now; sync_dist only averages equal numbers (and
        # keeps Lightning from warning that epoch-level logs should be synchronised).
        for name in ("loss", "nce", "mse"):
            self.log(f"val/{name}", means[name], sync_dist=True)
        # Every clip has n_masked_val predictions, so the clip mean is the masked accuracy.
        self.log("val/acc", means["acc"], prog_bar=True, sync_dist=True)
        # Like the originals, the plateau schedule reacts to each evaluation after warm-up.
        if not self.trainer.sanity_checking and self.global_step >= self.hparams.warmup_steps:
            self.plateau.step(means["acc"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay, plain = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (plain if no_weight_decay(name, param) else decay).append(param)
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas))

    def on_fit_start(self) -> None:
        if self.hparams.schedule == "cosine" and self.trainer.max_steps <= 0:
            raise ValueError("model.schedule=cosine needs trainer.max_steps (the decay length)")

    def lr_at(self, step: int) -> float:
        """Learning rate for optimizer step `step` (warm-up, then plateau scale or cosine)."""
        hp = self.hparams
        warm = min(1.0, (step + 1) / hp.warmup_steps) if hp.warmup_steps > 0 else 1.0
        if hp.schedule == "plateau":
            return hp.lr * warm * self.plateau.scale
        span = max(1, self.trainer.max_steps - hp.warmup_steps)
        progress = min(1.0, max(0, step - hp.warmup_steps) / span)
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return warm * (hp.min_lr + (hp.lr - hp.min_lr) * cosine)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["lr_plateau"] = asdict(self.plateau)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "lr_plateau" in checkpoint:
            self.plateau = PlateauScale(**checkpoint["lr_plateau"])

    def on_fit_end(self) -> None:
        """Export the encoder next to the logs: what fine-tuning and embedding read."""
        # Every rank must ask: trainer.log_dir is broadcast from rank 0.
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        path = folder / "encoder.pt"
        save_encoder(self.encoder, path, extra={"pretrain_step": self.global_step})
        print(f"exported encoder: {path}")

    # ---- pictures ----------------------------------------------------------------------

    def _log_picture(self, fbank: Tensor, out: MSPMOutput) -> None:
        """Input, mask and reconstruction of one clip as a TensorBoard figure."""
        logger = next((lg for lg in self.loggers if isinstance(lg, TensorBoardLogger)), None)
        if logger is None:
            return
        patches = self.encoder.unfold_patches(fbank[None])[0].clone()  # (Np, patch_dim)
        masked_input = patches.clone()
        masked_input[out.mask] = 0.0
        patches[out.mask] = out.reconstruction.to(patches.dtype)
        figure = mspm_figure(
            fbank.float().cpu(),
            self._fold(masked_input),
            self._fold(patches),
        )
        logger.experiment.add_figure("mspm/example", figure, global_step=self.global_step)

    def _fold(self, patches: Tensor) -> Tensor:
        """Patches back to a spectrogram: (Np, patch_dim) -> (frames, mel_bins) on CPU."""
        cfg = self.encoder.cfg
        size = (cfg.num_mel_bins, cfg.input_frames)
        image = F.fold(
            patches.float().T[None].cpu(), size, kernel_size=cfg.patch, stride=cfg.stride
        )
        return image[0, 0].T


def mspm_figure(fbank: Tensor, masked: Tensor, reconstruction: Tensor) -> Any:
    """Three stacked panels, time along x: input, masked input, input with predicted patches.

    Each argument: (frames, mel_bins) on CPU. matplotlib is imported here, on rank 0 only.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
    low, high = float(fbank.min()), float(fbank.max())
    panels = (("input", fbank), ("masked", masked), ("reconstruction", reconstruction))
    for axis, (title, image) in zip(axes, panels, strict=True):
        axis.imshow(image.T.numpy(), origin="lower", aspect="auto", vmin=low, vmax=high)
        axis.set_title(title)
        axis.set_ylabel("mel bin")
    axes[-1].set_xlabel("frame")
    return figure
