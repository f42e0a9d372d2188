"""Fine-tuning and linear probing of an `AudioEncoder` on a labelled clip-classification task.

One LightningModule for every downstream recipe (ESC-50, Speech Commands, AudioSet-20K,
FSDD, ...): the recipe YAML picks the initial weights, the input adaptation, the loss,
the metric that selects the checkpoint and the learning-rate schedule.

The flow, with the originals' settings as defaults (REFERENCE.md D, SSAMBA `traintest.py`):

    init (encoder file | Lightning .ckpt | official .pth | random)
      -> encoder.resize_input(input_frames, stride)       # e.g. 16 -> 10 overlap, same conv
      -> forward_features -> pool (mean over patches | cls) -> mlp_head = LayerNorm + Linear
      -> CE (soft targets, so mixup is exact) or BCE (multi-label, and Speech Commands)

Deliberate differences from the originals, each documented where it happens:
- CE uses the (mixed) target distribution instead of `argmax(labels.long())`, which in
  the originals truncates mixed labels to zero.
- Validation loss uses the training loss on logits (the originals applied it to sigmoid
  outputs).
- The warm-up is linear per step instead of a staircase updated every 50 steps.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from jsonargparse.typing import Path_fr
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ssamba.models.checkpoints import encoder_from_lightning, load_encoder, load_official
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.tasks.cli_common import read_yaml_piece
from ssamba.tasks.metrics import classification_metrics, update_metrics

RANDOM_INIT = (None, "", "none", "null", "random")
ENCODER_FILE_FORMAT = "ssamba-encoder"


# ---------------------------------------------------------------- initial weights


def encoder_from_spec(spec: Mapping[str, Any]) -> EncoderConfig:
    """`{family, size, **overrides}` -> EncoderConfig (the recipe's `model.encoder`)."""
    spec = dict(spec)
    try:
        family, size = spec.pop("family"), spec.pop("size")
    except KeyError as missing:
        raise ValueError(
            f"model.encoder: needs 'family' and 'size' (e.g. {{family: ssamba, size: tiny}}), "
            f"missing {missing}"
        ) from None
    return EncoderConfig.preset(family, size, **spec)


def load_init(path: str | Path) -> tuple[AudioEncoder, dict[str, torch.Tensor]]:
    """Encoder and any classification head stored in `path`, whatever wrote it.

    Accepts our exported encoder file, a Lightning `.ckpt` of the pretraining or the
    fine-tuning task, and the official SSAMBA / SSAST / AuM `.pth` files (family told
    from the key layout). Returns the encoder and the `mlp_head.*` tensors the file
    holds (empty when it has no classification head).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model.init: {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if path.suffix == ".ckpt":  # Lightning checkpoints may pickle more than tensors
            return _with_mlp_head(*encoder_from_lightning(path))
        raise ValueError(f"model.init: {path} is not a readable checkpoint ({err})") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"model.init: {path} holds a {type(obj).__name__}, not a state dict")
    if obj.get("format") == ENCODER_FILE_FORMAT:
        return load_encoder(path), {}
    state = obj.get("state_dict")
    if isinstance(state, Mapping) and any(k.startswith("encoder.") for k in state):
        return _with_mlp_head(*encoder_from_lightning(path))
    return _with_mlp_head(*load_official(obj, family=None))


def _with_mlp_head(
    encoder: AudioEncoder, heads: Mapping[str, torch.Tensor]
) -> tuple[AudioEncoder, dict[str, torch.Tensor]]:
    """Keep only the `mlp_head.*` entries: pretraining heads play no part in fine-tuning."""
    return encoder, {k: v for k, v in heads.items() if k.startswith("mlp_head.")}


def check_architecture(loaded: EncoderConfig, requested: EncoderConfig, source: str) -> None:
    """A checkpoint must hold the encoder the recipe asks for: same family, width, depth."""
    fields = ("family", "embed_dim", "depth")
    have = {f: getattr(loaded, f) for f in fields}
    want = {f: getattr(requested, f) for f in fields}
    if have != want:
        raise ValueError(
            f"model.init: {source} holds a {have['family']} encoder (embed_dim "
            f"{have['embed_dim']}, depth {have['depth']}) but model.encoder asks for "
            f"{want['family']} (embed_dim {want['embed_dim']}, depth {want['depth']})"
        )


def _local_path(piece: dict[str, Any] | Path_fr) -> dict[str, Any] | Path:
    """A recipe path as an absolute Path: jsonargparse resolves it against the recipe's
    folder, which `str()` would drop."""
    return piece if isinstance(piece, Mapping) else Path(os.fspath(piece))


# ---------------------------------------------------------------- learning-rate schedule


def lr_factor(
    step: int,
    epoch: int,
    *,
    schedule: str,
    warmup_steps: int,
    decay_start: int,
    decay_every: int,
    decay_gamma: float,
    total_steps: float = math.inf,
) -> float:
    """Multiplier of the base learning rate before optimizer step `step` in epoch `epoch`.

    Both counters are 0-based. `multistep` is the originals' MultiStepLR stepped once per
    epoch with milestones `range(decay_start, 1000, decay_every)`: during epoch `e` the
    rate is `gamma ** #(milestones <= e)`. `cosine` decays from 1 to 0 over the steps
    after warm-up. Warm-up multiplies linearly from 1/warmup_steps to 1.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if schedule == "constant":
        return warm
    if schedule == "multistep":
        passed = 0 if epoch < decay_start else (epoch - decay_start) // decay_every + 1
        return warm * decay_gamma**passed
    if schedule == "cosine":
        if not math.isfinite(total_steps):
            raise ValueError(
                "model.schedule: cosine needs a known number of steps "
                "(set trainer.max_steps, or trainer.max_epochs with a sized train loader)"
            )
        span = max(1.0, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        return warm * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"model.schedule: {schedule!r} is not multistep|cosine|constant")


# ---------------------------------------------------------------- weight averaging


class EpochWeightAveraging(Callback):
    """Average of the model weights at the end of epochs `first_epoch..last_epoch`.

    The AudioSet-20K recipe of SSAST/SSAMBA evaluates the uniform average of the epoch
    snapshots 12..40 (`--wa_start 12 --wa_end 40`; epochs counted from 1, inclusive).
    Rather than saving one file per epoch and reloading them, the running sum is kept in
    memory (and in the checkpoint, so resuming keeps it). When training ends the average
    replaces the weights and is saved to `averaged_path`, which the fine-tuning runner
    then tests instead of the best-on-validation checkpoint.
    """

    def __init__(self, first_epoch: int, last_epoch: int, filename: str = "averaged.ckpt"):
        if not 1 <= first_epoch <= last_epoch:
            raise ValueError(
                f"model.weight_averaging: need 1 <= first <= last epoch, got "
                f"[{first_epoch}, {last_epoch}]"
            )
        self.first_epoch, self.last_epoch, self.filename = first_epoch, last_epoch, filename
        self.sum: dict[str, torch.Tensor] = {}
        self.count = 0
        self.averaged_path: str | None = None

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if not self.first_epoch <= epoch <= self.last_epoch:
            return
        for name, value in pl_module.state_dict().items():
            value = value.detach().to("cpu", torch.float64 if value.is_floating_point() else None)
            self.sum[name] = self.sum[name] + value if name in self.sum else value.clone()
        self.count += 1

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.count == 0:
            raise RuntimeError(
                f"model.weight_averaging: training ended at epoch {trainer.current_epoch} "
                f"before the averaging window [{self.first_epoch}, {self.last_epoch}] began"
            )
        reference = pl_module.state_dict()
        averaged = {
            name: (total / self.count if total.is_floating_point() else total).to(
                reference[name].dtype
            )
            for name, total in self.sum.items()
        }
        pl_module.load_state_dict(averaged)
        directory = Path(trainer.checkpoint_callback.dirpath or trainer.default_root_dir)
        self.averaged_path = str(directory / self.filename)
        trainer.save_checkpoint(self.averaged_path, weights_only=True)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.sum, "count": self.count}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.sum, self.count = state_dict["sum"], state_dict["count"]


# ---------------------------------------------------------------- the task


class ClassifyTask(LightningModule):
    """Clip classifier: encoder + pooling + `mlp_head`, fine-tuned or linearly probed.

    Batches are the labelled ones of docs/design.md: `fbank: (B, T, F)`, `target: (B, C)`
    one-/multi-hot or mixed, `label: (B,)` (-1 for multi-label clips).
    """

    def __init__(
        self,
        num_classes: int,
        init: str | None = None,
        encoder: dict[str, Any] | Path_fr | None = None,
        input_frames: int | None = None,
        stride: int | list[int] | None = None,
        pooling: Literal["mean", "cls"] = "mean",
        mode: Literal["finetune", "linear"] = "finetune",
        multilabel: bool = False,
        loss: Literal["ce", "bce"] = "ce",
        metric: Literal["acc", "mAP"] = "acc",
        optimizer: Literal["adam", "adamw"] = "adam",
        lr: float = 1e-4,
        head_lr_mult: float = 1.0,
        weight_decay: float = 5e-7,
        betas: tuple[float, float] = (0.95, 0.999),
        schedule: Literal["multistep", "cosine", "constant"] = "multistep",
        warmup_steps: int = 0,
        decay_start: int = 5,
        decay_every: int = 1,
        decay_gamma: float = 0.85,
        weight_averaging: list[int] | None = None,
    ) -> None:
        """
        Args:
            num_classes: Output classes; linked from `data.num_classes` by `ssamba finetune`.
            init: Initial encoder weights: an exported encoder file, a Lightning `.ckpt` of
                pretraining or fine-tuning, an official SSAMBA/SSAST/AuM `.pth`, or
                null/"random" for random weights built from `encoder`.
            encoder: `{family, size, **EncoderConfig overrides}`, inline or a YAML file
                (`recipes/model/*.yaml`). Required for random init; with a checkpoint it
                is checked against what the file holds.
            input_frames: Fine-tuning input length in frames (target_length of the data);
                null keeps the encoder's.
            stride: Patch stride (int or [freq, time]); 10 gives the originals' overlapping
                fine-tuning patches. Conv weights are kept; the position embedding is resized.
            pooling: "mean" over patch tokens (the originals' ft_avgtok) or the "cls" token.
            mode: "finetune" trains everything; "linear" freezes the encoder (eval mode,
                no gradients) and trains only the head.
            multilabel: Clips may carry several labels (AudioSet): mAP only, no accuracy.
            loss: "ce" (single-label; soft targets allowed) or "bce" (multi-label; the
                originals also use it for Speech Commands).
            metric: "acc" or "mAP" on the validation data selects the checkpoint to test.
            optimizer: "adam" (the originals, L2 weight decay) or "adamw" (decoupled decay).
            lr: Base learning rate of the encoder.
            head_lr_mult: The head's learning rate is lr * head_lr_mult (originals: head_lr).
            weight_decay: 5e-7 as in the originals.
            betas: Adam betas; the originals use (0.95, 0.999).
            schedule: "multistep" (originals), "cosine" or "constant", after the warm-up.
            warmup_steps: Linear warm-up steps (the originals use 1000 when warm-up is on).
            decay_start: multistep: first milestone epoch (originals: lrscheduler_start).
            decay_every: multistep: epochs between milestones (lrscheduler_step).
            decay_gamma: multistep: factor per milestone (lrscheduler_decay).
            weight_averaging: [first, last] epoch (1-based, inclusive) whose end-of-epoch
                weights are averaged and tested (AudioSet-20K recipe); null disables.
        """
        super().__init__()
        self.save_hyperparameters()
        spec = None if encoder is None else read_yaml_piece(_local_path(encoder))
        self.hparams.encoder = spec  # a plain dict, so checkpoints load with weights_only
        if multilabel and metric == "acc":
            raise ValueError("model.metric: 'acc' is undefined for multi-label tasks; use mAP")
        if multilabel and loss == "ce":
            raise ValueError("model.loss: 'ce' needs single-label targets; use bce")
        if mode not in ("finetune", "linear"):
            raise ValueError(f"model.mode: {mode!r} is not finetune|linear")
        self.encoder, head_state = self._build_encoder(init, spec, input_frames, stride)
        dim = self.encoder.embed_dim
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        self.head_source = self._maybe_load_head(head_state, init)
        if mode == "linear":
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        self.val_metrics = classification_metrics(num_classes, multilabel, "val/")
        self.test_metrics = classification_metrics(num_classes, multilabel, "test/")

    @staticmethod
    def _build_encoder(
        init: str | None,
        spec: dict[str, Any] | None,
        input_frames: int | None,
        stride: int | list[int] | None,
    ) -> tuple[AudioEncoder, dict[str, torch.Tensor]]:
        requested = encoder_from_spec(spec) if spec else None
        if init in RANDOM_INIT:
            if requested is None:
                raise ValueError(
                    "model.encoder: required with random init (model.init null), "
                    "e.g. {family: ssamba, size: tiny}; to fine-tune a pretrained encoder, "
                    "set model.init to its file (encoder.pt, .ckpt or official .pth)"
                )
            encoder, heads = AudioEncoder(requested), {}
        else:
            encoder, heads = load_init(init)
            if requested is not None:
                check_architecture(encoder.cfg, requested, str(init))
        if input_frames is not None or stride is not None:  # the originals' 16 -> 10 overlap
            encoder.resize_input(
                input_frames=input_frames,
                stride=stride if stride is None or isinstance(stride, int) else tuple(stride),
            )
        return encoder, heads

    def _maybe_load_head(self, head_state: dict[str, torch.Tensor], init: str | None) -> str | None:
        """Reuse a stored `mlp_head` when it fits this task (same classes); say where from."""
        if not head_state:
            return None
        own = self.mlp_head.state_dict()
        stored = {k.removeprefix("mlp_head."): v for k, v in head_state.items()}
        if stored.keys() != own.keys() or any(stored[k].shape != own[k].shape for k in own):
            return None
        self.mlp_head.load_state_dict(stored)
        return str(init)

    # ------------------------------------------------------------ forward

    def train(self, mode: bool = True) -> ClassifyTask:
        """Keep a frozen encoder in eval mode (no dropout / drop-path) while the head trains."""
        super().train(mode)
        if self.hparams.mode == "linear":
            self.encoder.eval()
        return self

    def embed(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank: (batch, frames, mel_bins) -> pooled clip embedding (batch, dim)."""
        with torch.set_grad_enabled(self.hparams.mode == "finetune" and torch.is_grad_enabled()):
            tokens = self.encoder.forward_features(fbank)
            return self.encoder.pool(tokens, self.hparams.pooling)

    def forward(self, fbank: torch.Tensor) -> torch.Tensor:
        """fbank: (batch, frames, mel_bins) -> logits (batch, num_classes)."""
        return self.mlp_head(self.embed(fbank))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE against the target distribution (mixup-exact), or BCE per class."""
        if self.hparams.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target)

    def _checked_batch(self, batch: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        target = batch["target"]
        if target.shape[-1] != self.hparams.num_classes:
            raise ValueError(
                f"batch targets have {target.shape[-1]} classes but model.num_classes is "
                f"{self.hparams.num_classes} (clips {list(batch.get('id', []))[:3]}...)"
            )
        if not self.hparams.multilabel and bool((batch["label"] < 0).any()):
            ids, labels = batch["id"], batch["label"].tolist()
            clip = next(i for i, lab in zip(ids, labels, strict=True) if lab < 0)
            raise ValueError(
                f"clip {clip!r} has several labels but model.multilabel is false; "
                "set model.multilabel: true (with loss bce, metric mAP)"
            )
        return batch["fbank"], target.float()

    # ------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        fbank, target = self._checked_batch(batch)
        loss = self.loss(self(fbank), target)
        self.log(
            "train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(target)
        )
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        fbank, target = self._checked_batch(batch)
        logits = self(fbank)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        update_metrics(metrics, logits, target)
        self.log(f"{stage}/loss", self.loss(logits, target), on_epoch=True, batch_size=len(target))
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    # ------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam(W) with two groups: encoder at lr, head at lr * head_lr_mult.

        No torch scheduler: `on_train_batch_start` sets every group's rate from
        `lr_factor(global_step, current_epoch)`, a pure function of the two counters that
        Lightning restores on resume, so no scheduler state can drift.
        """
        hp = self.hparams
        groups = [{"params": list(self.mlp_head.parameters()), "base_lr": hp.lr * hp.head_lr_mult}]
        if hp.mode == "finetune":
            groups.insert(0, {"params": list(self.encoder.parameters()), "base_lr": hp.lr})
        for group in groups:
            group["lr"] = group["base_lr"]
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def on_train_start(self) -> None:
        # Only the cosine schedule needs it; asking Lightning once is enough.
        self._total_steps = float(self.trainer.estimated_stepping_batches)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        factor = lr_factor(
            self.global_step,
            self.current_epoch,
            schedule=hp.schedule,
            warmup_steps=hp.warmup_steps,
            decay_start=hp.decay_start,
            decay_every=hp.decay_every,
            decay_gamma=hp.decay_gamma,
            total_steps=self._total_steps,
        )
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["base_lr"] * factor

    def configure_callbacks(self) -> list[Callback]:
        """Keep the best epoch on validation data (never test data); optional averaging."""
        metric = f"val/{self.hparams.metric}"
        callbacks: list[Callback] = [
            ModelCheckpoint(
                monitor=metric,
                mode="max",
                filename="best-epoch{epoch}",
                auto_insert_metric_name=False,
                save_last=True,
            )
        ]
        if self.hparams.weight_averaging:
            callbacks.append(EpochWeightAveraging(*self.hparams.weight_averaging))
        return callbacks

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Store the exact (resized) encoder config so the file rebuilds without `init`."""
        checkpoint["encoder_config"] = self.encoder.cfg.to_dict()
