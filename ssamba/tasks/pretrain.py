"""Masked spectrogram patch modelling (MSPM): the SSAST/SSAMBA self-supervised objective.

A clip's filterbank is cut into patches; some are replaced by a learned mask embedding
and the encoder must, at every masked position,
- pick out the true input patch among the clip's other masked patches (discriminative,
  InfoNCE through `cpredlayer`), and
- regress the raw patch values (generative, MSE through `gpredlayer`).
The joint loss is `nce_weight * nce + mse_weight * mse` (1 and 10 in the originals), each
term from its own forward pass with its own mask, as the originals do. A term of weight 0
is not computed at all, nor its head built (the CPU recipe trains the generative half only:
one pass per step instead of two, and no parameters that no loss reaches under DDP); its
metrics are then not logged.

Settings: `model.objective` is an `MSPMConfig` (the default) or an `EATConfig`. Faithful
defaults, documented options (docs/originals.md#mspm):
- `nce_axis="original"`: `log_softmax(targets @ preds.T, dim=-1)`, a softmax over the
  predictions, which the released code uses; `"paper"` is equation 1 of the SSAST paper
  (softmax over the candidate targets). ssast#13 discusses the difference.
- raw dot products (`temperature=1`), targets are the normalised input patches, detached
  (with `data.augment.clean_targets`, those of the batch's un-noised `clean` filterbank,
  while the encoder reads the augmented `fbank`; the teacher-student teacher too).
- `masking="original"` draws masks as the released code does (biased towards the middle
  frequency rows, patch 0 never masked); `"uniform"` masks every row equally.
- `val/acc` is the originals' "masked acc": softmax of `targets @ preds.T` over the
  predictions, then for each prediction, is the target with the highest probability its
  own patch. `val/acc_raw` takes the argmax of the raw scores instead.

An `EATConfig` objective swaps MSPM for the teacher-student objective of data2vec 2.0 /
EAT (`ssamba.tasks.objectives.eat`): an EMA teacher encodes the whole
clip, the student regresses the teacher's averaged top-layer features at the masked
patches of several inverse-block-masked copies, plus a cls-token utterance loss. The
teacher is part of the module (`eat.teacher.*`), so checkpoints carry it; the student
`encoder` is what is exported.

Learning rate (`model.schedule`, a `ScheduleConfig`; `ssamba.tasks.schedules`): warm-up
over `warmup_steps` (linear, or the originals' staircase), then `plateau` (halve when the
validation masked accuracy has not improved for `plateau_patience` evaluations, as the
originals' ReduceLROnPlateau, which counts the evaluations inside the warm-up too) or
`cosine` to `min_lr` at `trainer.max_steps`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile
from ssamba.tasks.masking import MaskingKind, make_mask, mask_generator
from ssamba.tasks.objectives.eat import EATConfig, EATObjective
from ssamba.tasks.schedules import PlateauScale, Warmup, apply_lr, lr_factor

__all__ = ["MSPMConfig", "PretrainTask", "ScheduleConfig", "info_nce", "no_weight_decay"]

# The originals validate with 400 of 512 masked patches whatever they train with.
VAL_MASK_FRACTION = 400 / 512
# Metrics of each objective (and each MSPM half) a validation epoch sums, weighted by clips.
NCE_METRICS = ("nce", "acc", "acc_raw")
MSE_METRICS = ("mse",)
EAT_METRICS = ("frame", "utterance")
NCE_AXES = ("original", "paper")
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


def info_nce(
    preds: Tensor,
    targets: Tensor,
    axis: Literal["original", "paper"],
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Within-clip InfoNCE between predictions and targets at the masked positions.

    preds, targets: (batch, masked, patch_dim); negatives are the clip's other masked
    patches. Returns scalars (loss, accuracy, raw accuracy), averaged over every masked
    patch:
    - accuracy, the originals' masked accuracy: scores `targets @ preds.T` (rows targets,
      columns predictions), softmax over each row, then for each prediction (column) the
      target of highest probability must be its own;
    - raw accuracy: for each prediction, the target of highest raw score is its own.
    """
    with torch.autocast(preds.device.type, enabled=False):
        scores = targets.float() @ preds.float().transpose(1, 2) / temperature  # (B, M, M) [t, p]
        log_probs = F.log_softmax(scores, dim=-1 if axis == "original" else 1)
        own = torch.arange(scores.shape[1], device=scores.device)
        loss = -log_probs.diagonal(dim1=1, dim2=2).mean()
        accuracy = (scores.softmax(dim=-1).argmax(dim=1) == own).float().mean()
        raw_accuracy = (scores.argmax(dim=1) == own).float().mean()
    return loss, accuracy, raw_accuracy


def no_weight_decay(name: str, param: Tensor) -> bool:
    """Norm weights, biases, position/special tokens and SSM rates are not decayed."""
    return param.ndim <= 1 or name.rsplit(".", 1)[-1] in NO_DECAY_NAMES


@dataclass(frozen=True)
class MSPMConfig:
    """Settings of masked spectrogram patch modelling (`model.objective` of a recipe).

    n_masked: patches masked per clip in training (400 of 512 in the originals).
    n_masked_val: patches masked in validation; None: 400/512 of the patches, as the
        originals validate whatever they train with.
    masking: "original" reproduces the released code's mask distribution (rows near the
        middle masked most, patch 0 never); "uniform" masks every frequency row equally.
        Frame models always sample uniformly.
    cluster_sizes: block sizes drawn per clip (the originals: 3, 4, 5).
    nce_weight, mse_weight: the joint loss' weights (the originals: 1 and 10); a half of
        weight 0 is skipped: no forward pass, no head, no metrics.
    nce_axis: "original" (softmax over the predictions, the released code) or "paper"
        (SSAST's equation 1, over the candidate targets).
    temperature: divides the InfoNCE scores (the originals: 1, raw dot products).
    """

    n_masked: int = 400
    n_masked_val: int | None = None
    masking: MaskingKind = "uniform"
    cluster_sizes: tuple[int, ...] = (3, 4, 5)
    nce_weight: float = 1.0
    mse_weight: float = 10.0
    nce_axis: Literal["original", "paper"] = "original"
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"model.objective.temperature={self.temperature} must be > 0")
        if self.nce_axis not in NCE_AXES:
            raise ValueError(f"model.objective.nce_axis={self.nce_axis!r}: choose {NCE_AXES}")
        for key in ("nce_weight", "mse_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"model.objective.{key}={getattr(self, key)} must be >= 0")
        if not (self.uses_nce or self.uses_mse):
            raise ValueError(
                "model.objective.nce_weight and mse_weight are both 0: nothing to learn"
            )
        object.__setattr__(self, "cluster_sizes", tuple(self.cluster_sizes))  # YAML lists

    @property
    def uses_nce(self) -> bool:
        """Whether the discriminative (InfoNCE) pass runs."""
        return self.nce_weight > 0

    @property
    def uses_mse(self) -> bool:
        """Whether the generative (reconstruction) pass runs."""
        return self.mse_weight > 0

    def metric_names(self) -> tuple[str, ...]:
        """What a step measures: the loss, then each running half's own metrics."""
        return (
            "loss",
            *(NCE_METRICS if self.uses_nce else ()),
            *(MSE_METRICS if self.uses_mse else ()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ScheduleConfig:
    """The learning-rate shape of a pretraining run (`model.schedule`), a multiple of `lr`.

    kind: after the warm-up, "plateau" (halve by `plateau_factor` when the validation
        masked accuracy has not improved for `plateau_patience` evaluations, the
        originals' ReduceLROnPlateau) or "cosine" (to `min_lr` at `trainer.max_steps`).
    warmup_steps, warmup: warm-up length and shape, "linear" or the originals'
        "staircase" (raised every 50 steps, exactly 0 for the first 50).
    """

    kind: Literal["plateau", "cosine"] = "plateau"
    warmup_steps: int = 1000
    warmup: Warmup = "linear"
    plateau_factor: float = 0.5
    plateau_patience: int = 2
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("plateau", "cosine"):
            raise ValueError(f"model.schedule.kind={self.kind!r}: choose plateau or cosine")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_MSPM = MSPMConfig()
DEFAULT_SCHEDULE = ScheduleConfig()


def objective_name(objective: MSPMConfig | EATConfig) -> Literal["mspm", "eat"]:
    """Which objective a config selects, "mspm" or "eat" (logs, provenance, metrics)."""
    return "eat" if isinstance(objective, EATConfig) else "mspm"


@dataclass
class MSPMOutput:
    """One MSPM evaluation: the loss, each running half's metrics (`metrics`, named as
    `MSPMConfig.metric_names` without "loss") and, when the generative half runs, the
    tensors a picture of it needs (first clip)."""

    loss: Tensor
    metrics: dict[str, Tensor]
    mask: Tensor | None = None  # (num_patches,) bool, of the generative pass
    reconstruction: Tensor | None = None  # (masked, patch_dim), generative predictions


class PretrainTask(LightningModule):
    """Self-supervised pretraining (MSPM or teacher-student) around any `AudioEncoder`.

    Batches: `{"fbank": (batch, frames, mel_bins), "id": [...], ...}`.
    Parameter names: `encoder.*` (exported at the end of fit); MSPM's `cpredlayer.*` and
    `gpredlayer.*` as in the original checkpoints; the teacher-student objective's
    `eat.*` (its EMA teacher and decoder).
    """

    def __init__(
        self,
        encoder: EncoderConfig,
        input_frames: int | None = None,
        objective: MSPMConfig | EATConfig = DEFAULT_MSPM,
        optimizer: Literal["adamw", "adam"] = "adamw",
        lr: float = 1e-4,
        weight_decay: float = 5e-8,
        betas: tuple[float, float] = (0.95, 0.999),
        schedule: ScheduleConfig = DEFAULT_SCHEDULE,
        image_every_n_steps: int = 0,
        seed: int = 0,
    ) -> None:
        """
        Args:
            encoder: the encoder's configuration, inline or a YAML piece such as
                `recipes/model/ssamba_tiny.yaml`; `--model.encoder.depth 2` overrides one
                field of it. Fields left null take the family's published values.
            input_frames: frames per clip; `ssamba pretrain` takes it from the data's
                feature settings (`data.features.target_length`).
            objective: `MSPMConfig` (SSAST/SSAMBA, the default) or `EATConfig` (EMA
                teacher-student, data2vec 2.0 / EAT). A recipe selects the latter with
                `objective: {class_path: EATConfig, init_args: {...}}`.
            optimizer: "adamw" (SSAMBA: decoupled decay 5e-8) or "adam" (SSAST: L2 decay
                5e-7); norms, biases, tokens and SSM rates are never decayed.
            lr, weight_decay, betas: the optimiser's peak rate and settings.
            schedule: warm-up and decay of the rate (`ScheduleConfig`).
            image_every_n_steps: log input / mask / reconstruction to TensorBoard (0: never).
            seed: training masks are drawn from (seed, rank, step, micro-batch), validation
                masks from (seed, clip id): runs and resumes repeat them, every micro-batch
                of an accumulated step gets its own, and validation masks are the same at
                every evaluation on any number of processes.
        """
        super().__init__()
        if input_frames is not None:
            encoder = replace(encoder, input_frames=input_frames)
        self.encoder = AudioEncoder(encoder)
        self.objective = objective
        self.schedule = schedule
        self.kind = objective_name(objective)
        num_patches, dim = self.encoder.num_patches, self.encoder.embed_dim
        if isinstance(objective, MSPMConfig):
            if objective.n_masked_val is None:
                n_masked_val = max(1, round(VAL_MASK_FRACTION * num_patches))
                objective = self.objective = replace(objective, n_masked_val=n_masked_val)
            for key in ("n_masked", "n_masked_val"):
                value = getattr(objective, key)
                if not 0 < value <= num_patches:
                    raise ValueError(
                        f"model.objective.{key}={value}: the encoder has only {num_patches} "
                        f"patches (grid {tuple(self.encoder.grid)}); choose 1..{num_patches}"
                    )
        self.save_hyperparameters()
        # Plain data only, so checkpoints load with weights_only=True.
        self.hparams.encoder = encoder.to_dict()
        self.hparams.objective = {"kind": self.kind, **objective.to_dict()}
        self.hparams.schedule = schedule.to_dict()
        if isinstance(objective, EATConfig):
            self.eat = EATObjective(self.encoder, objective)
        else:  # only the running halves' heads: DDP refuses parameters no loss reaches
            if objective.uses_nce:
                self.cpredlayer = self._head(dim, self.encoder.patch_dim)
            if objective.uses_mse:
                self.gpredlayer = self._head(dim, self.encoder.patch_dim)
        self.plateau = PlateauScale(schedule.plateau_factor, schedule.plateau_patience)
        metrics = ("loss", *EAT_METRICS) if self.kind == "eat" else objective.metric_names()
        self._val_names = (*metrics, "clips")
        self._val_sums = torch.zeros(len(self._val_names))  # summed over the validation epoch

    @staticmethod
    def _head(dim: int, patch_dim: int) -> nn.Sequential:
        return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, patch_dim))

    # ---- the objective -----------------------------------------------------------------

    def masked_hidden(self, fbank: Tensor, mask: Tensor) -> Tensor:
        """Encoder outputs at the masked patches: (B, T, F), (B, Np) -> (B, masked, D)."""
        patches = self.encoder.patch_tokens(self.encoder.forward_features(fbank, mask=mask))
        return patches[mask].view(fbank.shape[0], -1, patches.shape[-1])

    def mspm(
        self,
        fbank: Tensor,
        n_masked: int,
        generator: torch.Generator | Sequence[torch.Generator],
        clean: Tensor | None = None,
    ) -> MSPMOutput:
        """Joint discriminative + generative loss on one batch; fbank: (B, T, F).

        Each half of nonzero weight draws its own mask, the discriminative one first.

        clean: (B, T, F), the same clips before augmentation (`data.augment.clean_targets`):
        the targets are its patches while the encoder reads `fbank`. None: `fbank`'s own.
        """
        cfg = self.objective
        assert isinstance(cfg, MSPMConfig)
        batch = fbank.shape[0]
        source = fbank if clean is None else clean
        targets = self.encoder.unfold_patches(source).detach()  # (B, Np, patch_dim)

        def draw() -> Tensor:
            return make_mask(
                batch,
                self.encoder.grid,
                n_masked,
                cfg.cluster_sizes,
                generator,
                fbank.device,
                masking=cfg.masking,
            )

        def at(mask: Tensor, values: Tensor) -> Tensor:
            return values[mask].view(batch, n_masked, *values.shape[2:])

        # Two passes with independent masks, one per loss, as the originals.
        out = MSPMOutput(loss=fbank.new_zeros((), dtype=torch.float32), metrics={})
        if cfg.uses_nce:
            mask = draw()
            hidden = self.masked_hidden(fbank, mask)
            nce, accuracy, raw_accuracy = info_nce(
                self.cpredlayer(hidden), at(mask, targets), cfg.nce_axis, cfg.temperature
            )
            out.loss = out.loss + cfg.nce_weight * nce
            out.metrics |= {"nce": nce, "acc": accuracy, "acc_raw": raw_accuracy}
        if cfg.uses_mse:
            mask = draw()
            reconstruction = self.gpredlayer(self.masked_hidden(fbank, mask))
            mse = (reconstruction.float() - at(mask, targets).float()).square().mean()
            out.loss = out.loss + cfg.mse_weight * mse
            out.metrics["mse"] = mse
            out.mask, out.reconstruction = mask[0], reconstruction[0].detach()
        return out

    def _train_generator(self, batch_idx: int) -> torch.Generator:
        """Training masks from (seed, rank, optimizer step, micro-batch)."""
        micro = batch_idx % self.trainer.accumulate_grad_batches
        return mask_generator(self.hparams.seed, "train", self.global_rank, self.global_step, micro)

    def _val_generators(self, clip_ids: Sequence[str]) -> list[torch.Generator]:
        """Validation masks keyed by each clip's id: rank-, world- and batch-independent."""
        return [mask_generator(self.hparams.seed, "val", clip_id) for clip_id in clip_ids]

    # ---- Lightning hooks ---------------------------------------------------------------

    def on_train_batch_start(self, batch: dict[str, Any], batch_idx: int) -> None:
        apply_lr(self.trainer.optimizers, self.lr_factor(self.global_step))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        fbank, clean = batch["fbank"], batch.get("clean")
        size = fbank.shape[0]
        self.log("train/lr", self.hparams.lr * self.lr_factor(self.global_step), batch_size=size)
        skipped = getattr(self.trainer.datamodule, "skipped", None)
        if callable(skipped):  # corrupt clips the data module dropped and counted
            self.log("data/skipped", float(sum(skipped().values())), batch_size=size)
        if isinstance(self.objective, EATConfig):
            out = self.eat(self.encoder, fbank, self._train_generator(batch_idx), clean)
            self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
            self.log("train/frame", out.frame, batch_size=size)
            self.log("train/utterance", out.utterance, batch_size=size)
            self.log("train/ema_decay", self._ema_decay, batch_size=size)
            return out.loss
        out = self.mspm(fbank, self.objective.n_masked, self._train_generator(batch_idx), clean)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=size)
        for name, value in out.metrics.items():
            self.log(f"train/{name}", value, prog_bar=name == "acc", batch_size=size)
        every = self.hparams.image_every_n_steps
        if (
            every
            and out.reconstruction is not None
            and self.global_step % every == 0
            and self.trainer.is_global_zero
        ):
            self._log_picture(fbank[0].detach(), out)
        return out.loss

    _ema_decay = 0.0

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """The teacher follows the student once per optimizer step (after it)."""
        if not isinstance(self.objective, EATConfig):
            return
        if (batch_idx + 1) % self.trainer.accumulate_grad_batches == 0:
            self._ema_decay = self.eat.update_teacher(self.encoder, self.global_step)

    def on_validation_epoch_start(self) -> None:
        self._val_sums = torch.zeros(len(self._val_names), device=self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        fbank = batch["fbank"]
        clips = fbank.shape[0]
        # The same masks at every evaluation, so the metrics are comparable across steps.
        generators = self._val_generators(batch["id"])
        if isinstance(self.objective, EATConfig):
            out = self.eat(self.encoder, fbank, generators)
            values = [out.loss, out.frame, out.utterance]
        else:
            assert self.objective.n_masked_val is not None  # set in __init__
            mspm = self.mspm(fbank, self.objective.n_masked_val, generators)
            values = [mspm.loss, *(mspm.metrics[name] for name in self._val_names[1:-1])]
        self._val_sums += torch.stack(
            [v.detach() * clips for v in values] + [values[0].new_tensor(clips)]
        )

    def on_validation_epoch_end(self) -> None:
        # One all-reduce for every metric: ranks may hold different numbers of validation
        # batches, so nothing may synchronise per batch.
        sums = self.trainer.strategy.reduce(self._val_sums, reduce_op="sum")
        names = self._val_names
        means = dict(zip(names, (sums / sums[-1].clamp(min=1)).tolist(), strict=True))
        # Every rank holds the same values now; sync_dist only averages equal numbers (and
        # keeps Lightning from warning that epoch-level logs should be synchronised).
        for name in names[:-1]:
            if name != "acc":
                self.log(f"val/{name}", means[name], sync_dist=True)
        # Every clip has n_masked_val predictions, so the clip mean is the masked accuracy.
        if "acc" in means:
            self.log("val/acc", means["acc"], prog_bar=True, sync_dist=True)
        # Like the originals' ReduceLROnPlateau, every evaluation counts, those inside the
        # warm-up too (the masked accuracy; without the InfoNCE half, the loss).
        if not self.trainer.sanity_checking:
            self.plateau.step(means["acc"] if "acc" in means else -means["loss"])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        decay, plain = [], []
        for name, param in self.named_parameters():
            if param.requires_grad:
                (plain if no_weight_decay(name, param) else decay).append(param)
        lr = self.hparams.lr
        groups = [
            {"params": decay, "weight_decay": self.hparams.weight_decay, "base_lr": lr},
            {"params": plain, "weight_decay": 0.0, "base_lr": lr},
        ]
        cls = torch.optim.AdamW if self.hparams.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, lr=lr, betas=tuple(self.hparams.betas))

    def on_fit_start(self) -> None:
        if self.schedule.kind == "cosine" and self.trainer.max_steps <= 0:
            raise ValueError(
                "model.schedule.kind=cosine needs trainer.max_steps (the decay length)"
            )

    def lr_factor(self, step: int) -> float:
        """Multiplier of `lr` for optimizer step `step` (warm-up, then plateau or cosine)."""
        cfg = self.schedule
        return lr_factor(
            step,
            0,
            schedule=cfg.kind,
            warmup_steps=cfg.warmup_steps,
            warmup=cfg.warmup,
            total_steps=self.trainer.max_steps if cfg.kind == "cosine" else math.inf,
            min_factor=cfg.min_lr / self.hparams.lr,
            plateau=self.plateau,
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Plateau state for resuming; encoder config and features for the encoder loader."""
        checkpoint["lr_plateau"] = asdict(self.plateau)
        checkpoint["encoder_config"] = self.encoder.cfg.to_dict()
        features = self.trained_features()
        checkpoint["features"] = None if features is None else features.to_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if "lr_plateau" in checkpoint:
            self.plateau = PlateauScale(**checkpoint["lr_plateau"])

    def on_fit_end(self) -> None:
        """Export the encoder next to the logs: what fine-tuning and embedding read."""
        # Every rank must ask: trainer.log_dir is broadcast from rank 0.
        folder = Path(self.trainer.log_dir or self.trainer.default_root_dir)
        if not self.trainer.is_global_zero:
            return
        provenance = {"kind": f"pretraining ({self.kind})", "step": self.global_step}
        bundle = EncoderFile(self.encoder, self.trained_features(), provenance=provenance)
        self.encoder_file = bundle.save(folder / "encoder.pt")  # `pretrain()` returns it
        print(f"exported encoder: {self.encoder_file}")

    def trained_features(self) -> FbankConfig | None:
        """The feature settings of the attached DataModule (its `fbank`), for inference."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer else None
        fbank = getattr(datamodule, "fbank", None)
        return fbank.for_inference() if isinstance(fbank, FbankConfig) else None

    # ---- pictures ----------------------------------------------------------------------

    def _log_picture(self, fbank: Tensor, out: MSPMOutput) -> None:
        """Input, mask and reconstruction of one clip as a TensorBoard figure."""
        assert out.mask is not None and out.reconstruction is not None  # generative half ran
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
