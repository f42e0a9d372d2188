"""Fine-tuning and linear probing of an `AudioEncoder` on a labelled clip-classification task.

One LightningModule for every downstream recipe (ESC-50, Speech Commands, AudioSet-20K,
FSDD, ...): the recipe YAML picks the initial weights, the input adaptation, the loss,
the metric that selects the checkpoint and the learning-rate schedule.

The flow, with the originals' settings as defaults (docs/originals.md#fine-tuning):

    init (any file `load_encoder_file` reads | random weights of `model.encoder`)
      -> encoder.resize_input(input_frames, stride)       # e.g. 16 -> 10 overlap, same conv
      -> forward_features -> pool (mean over patches | cls) -> mlp_head = LayerNorm + Linear
      -> CE (soft targets, so mixup is exact) or BCE (multi-label, and Speech Commands)

Deliberate differences from the originals, each documented where it happens:
- CE uses the (mixed) target distribution instead of `argmax(labels.long())`, which in
  the originals truncates mixed labels to zero.
- Validation loss uses the training loss on logits (the originals applied it to sigmoid
  outputs).
- The warm-up is linear per step by default (`warmup: staircase` is the originals').

`mode: adapter` (with an `adapter:` section, `ssamba.models.adapters.AdapterConfig`)
freezes the encoder and trains adapters or LoRA plus the head; its result is an adapter
file (`adapters.pt` beside the run's `encoder.pt`: adapters, head, labels and the base
encoder's path and weights checksum), which `load_encoder_file` puts back on that encoder.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn

from ssamba.features import FbankConfig
from ssamba.models.adapters import (
    AdapterConfig,
    parameter_counts,
    save_adapter_file,
    weights_sha256,
)
from ssamba.models.encoder import AudioEncoder, EncoderConfig, Pooling
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.tasks import say
from ssamba.tasks.callbacks import EpochWeightAveraging
from ssamba.tasks.metrics import classification_metrics, update_metrics
from ssamba.tasks.schedules import Warmup, apply_lr, lr_factor

RANDOM_INIT = (None, "", "none", "null", "random")
ADAPTER_FILE = "adapters.pt"
# Adapter mode moves these out of `encoder.*` in its checkpoints, so that the encoder
# loader reads a checkpoint of it as the untouched base encoder (see on_save_checkpoint).
_ADAPTERS_IN_MODEL, _ADAPTERS_IN_CKPT = "encoder.adapters.", "adapters."
_HEAD_IN_MODEL, _HEAD_IN_CKPT = "mlp_head.", "adapter_head."


def initial_encoder(init: str | None, encoder: EncoderConfig | None) -> EncoderFile:
    """The encoder to fine-tune: read from `init` (any kind of checkpoint), or random.

    With a file, `encoder` (if given) must describe the same architecture: the error names
    every field that differs. Random init needs `encoder`.
    """
    if init in RANDOM_INIT:
        if encoder is None:
            raise ValueError(
                "model.encoder: required with random init (model.init null), e.g. "
                "recipes/model/ssamba_tiny.yaml; to fine-tune a pretrained encoder, set "
                "model.init to its file (encoder.pt, .ckpt or official .pth)"
            )
        return EncoderFile(AudioEncoder(encoder), None, provenance={"kind": "random init"})
    bundle = load_encoder_file(init)
    if encoder is not None:
        have = bundle.encoder.cfg
        differences = have.architecture_differences(encoder)
        if differences:
            raise ValueError(
                f"model.init: {init} holds a {have.family} encoder (embed_dim "
                f"{have.embed_dim}, depth {have.depth}) but model.encoder asks for "
                f"{encoder.family} (embed_dim {encoder.embed_dim}, depth {encoder.depth}); "
                f"file vs recipe: {'; '.join(differences)}. Leave model.encoder unset to "
                "use the file's"
            )
    return bundle


class ClassifyTask(LightningModule):
    """Clip classifier: encoder + pooling + `mlp_head`, fine-tuned or linearly probed.

    Batches are the labelled ones of docs/design.md: `fbank: (B, T, F)`, `target: (B, C)`
    one-/multi-hot or mixed, `label: (B,)` (-1 for multi-label clips).
    """

    def __init__(
        self,
        num_classes: int,
        init: str | None = None,
        encoder: EncoderConfig | None = None,
        input_frames: int | None = None,
        stride: int | list[int] | None = None,
        pooling: Pooling = "mean",
        ignore_padding: bool = False,
        mode: Literal["finetune", "linear", "adapter"] = "finetune",
        adapter: AdapterConfig | None = None,
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
        warmup: Warmup = "linear",
        decay_start: int = 5,
        decay_every: int = 1,
        decay_gamma: float = 0.85,
        weight_averaging: list[int] | None = None,
    ) -> None:
        """
        Args:
            num_classes: Output classes; linked from `data.num_classes` by `ssamba finetune`.
            init: Initial encoder weights: an encoder file, a Lightning `.ckpt` of
                pretraining or fine-tuning, an official SSAMBA/SSAST/AuM `.pth`, or
                null/"random" for random weights built from `encoder`.
            encoder: The encoder's configuration (inline or a YAML piece from
                recipes/model/). Required for random init; with a checkpoint, leave it
                unset (the file says) or it must match the file's architecture.
            input_frames: Fine-tuning input length in frames (target_length of the data);
                null keeps the encoder's.
            stride: Patch stride (int or [freq, time]); 10 gives the originals' overlapping
                fine-tuning patches. Conv weights are kept; the position embedding is resized.
            pooling: "mean" over patch tokens (the originals' ft_avgtok), "stats" (their
                mean and standard deviation side by side: a head twice as wide),
                "band-stats" (those of each frequency band, bands side by side) or the
                "cls" token.
            ignore_padding: "mean", "stats" and "band-stats" read only the patches that
                hold the clip's own frames (the batch's `frames`), not the padding of clips
                shorter than the window. False (the originals): every patch.
            mode: "finetune" trains everything; "linear" freezes the encoder (eval mode,
                no gradients) and trains only the head; "adapter" freezes it too and
                trains the adapters of `adapter` and the head.
            adapter: with mode "adapter": kind (bottleneck|conv|lora), placement
                (parallel|sequential), size (bottleneck width / LoRA rank), where
                (mixer|mlp|both), scale_init, kernel_size (`AdapterConfig`).
            multilabel: Clips may carry several labels (AudioSet): mAP only, no accuracy;
                linked from `data.multi_label` by `ssamba finetune`.
            loss: "ce" (single-label; soft targets allowed) or "bce" (multi-label; the
                originals also use it for Speech Commands).
            metric: "acc" or "mAP" on the validation data selects the checkpoint to test.
            optimizer: "adam" (the originals, L2 weight decay) or "adamw" (decoupled decay).
            lr: Base learning rate of the encoder.
            head_lr_mult: The head's learning rate is lr * head_lr_mult (originals: head_lr).
            weight_decay: 5e-7 as in the originals.
            betas: Adam betas; the originals use (0.95, 0.999).
            schedule: "multistep" (originals), "cosine" or "constant", after the warm-up.
            warmup_steps: Warm-up steps (the originals use 1000 when warm-up is on).
            warmup: "linear", or "staircase" as the originals (updated every 50 steps).
            decay_start: multistep: first milestone epoch (originals: lrscheduler_start).
            decay_every: multistep: epochs between milestones (lrscheduler_step).
            decay_gamma: multistep: factor per milestone (lrscheduler_decay).
            weight_averaging: [first, last] epoch (1-based, inclusive) whose end-of-epoch
                weights are averaged and tested (AudioSet-20K recipe); null disables.
        """
        super().__init__()
        self.save_hyperparameters()
        # Plain data only, so checkpoints load with weights_only=True.
        self.hparams.encoder = None if encoder is None else encoder.to_dict()
        if isinstance(adapter, AdapterConfig):
            self.hparams.adapter = adapter.to_dict()
        if mode == "adapter" and init in RANDOM_INIT:
            raise ValueError(
                "model.mode adapter: needs a pretrained encoder file as model.init (the "
                "adapter file refers to it by path and checksum); random init has none"
            )
        if multilabel and metric == "acc":
            raise ValueError("model.metric: 'acc' is undefined for multi-label tasks; use mAP")
        if multilabel and loss == "ce":
            raise ValueError("model.loss: 'ce' needs single-label targets; use bce")
        bundle = initial_encoder(init, encoder)
        self.encoder = bundle.encoder
        # The base encoder as loaded (before any resize): what an adapter file refers to.
        self.base_reference = (
            {
                "path": str(Path(str(init)).resolve()),
                "sha256": weights_sha256(self.encoder),
                "config": self.encoder.cfg.to_dict(),
            }
            if mode == "adapter"
            else None
        )
        if input_frames is not None or stride is not None:  # the originals' 16 -> 10 overlap
            self.encoder.resize_input(
                input_frames=input_frames,
                stride=stride if stride is None or isinstance(stride, int) else tuple(stride),
            )
        # The mask embedding only serves masked pretraining: a trainable parameter that no
        # loss reaches would stop DDP ("parameters that were not used in producing the loss").
        self.encoder.mask_embed.requires_grad_(False)
        dim = self.encoder.pooled_dim(pooling)
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))
        self.head_source = self._maybe_load_head(bundle)
        self.trained_features = bundle.features  # what the encoder was trained on, if known
        if mode in ("linear", "adapter"):
            self.encoder.requires_grad_(False)
            self.encoder.eval()
        if mode == "adapter":
            spec = adapter if isinstance(adapter, AdapterConfig) else AdapterConfig(**adapter or {})
            self.encoder.add_adapters(spec)
        elif adapter is not None:
            raise ValueError(f"model.adapter: only used with mode adapter (mode is {mode!r})")
        if mode != "finetune":
            say(self.trainable_summary(), flush=True)
        self.val_metrics = classification_metrics(num_classes, multilabel, "val/")
        self.test_metrics = classification_metrics(num_classes, multilabel, "test/")

    def _maybe_load_head(self, bundle: EncoderFile) -> str | None:
        """Reuse a stored head when it fits this task (same classes); say where from.

        AuM's classifier is a bare Linear: it comes with an identity in place of the norm.
        """
        if not bundle.head:
            return None
        if "0.weight" not in bundle.head:
            self.mlp_head[0] = nn.Identity()
        own = self.mlp_head.state_dict()
        stored = bundle.head
        if stored.keys() != own.keys() or any(stored[k].shape != own[k].shape for k in own):
            self.mlp_head[0] = nn.LayerNorm(self.encoder.pooled_dim(self.hparams.pooling))
            return None
        self.mlp_head.load_state_dict(stored)
        return str(bundle.provenance.get("source"))

    def setup(self, stage: str) -> None:
        """Refuse data whose features are not the encoder's (kind, bins, MFCC stats)."""
        datamodule = getattr(self.trainer, "datamodule", None)
        fbank = getattr(datamodule, "fbank", None)
        if isinstance(fbank, FbankConfig):
            stats = (getattr(datamodule, "hparams", {}).get("features") or {}).get("stats")
            check_features(fbank, self.trained_features, self.encoder.cfg.num_mel_bins, stats)

    def trainable_share(self) -> dict[str, float]:
        """Parameters: the base encoder's, the trainable ones of the encoder (adapters in
        adapter mode), the head's, and `fraction` = trainable encoder / base encoder."""
        counts = parameter_counts(self.encoder)
        in_adapters = {id(p) for p in getattr(self.encoder, "adapters", nn.Module()).parameters()}
        trainable = counts["adapters"] + sum(
            p.numel()
            for p in self.encoder.parameters()
            if p.requires_grad and id(p) not in in_adapters
        )
        if self.hparams.mode == "linear":
            trainable = 0
        head = sum(p.numel() for p in self.mlp_head.parameters())
        return {
            "encoder_params": counts["encoder"],
            "trainable_encoder_params": trainable,
            "head_params": head,
            "fraction": trainable / counts["encoder"],
            "fraction_with_head": (trainable + head) / counts["encoder"],
        }

    def trainable_summary(self) -> str:
        share = self.trainable_share()
        what = f"adapters ({self.hparams.adapter})" if self.hparams.mode == "adapter" else "none"
        return (
            f"mode {self.hparams.mode}: trainable encoder parameters {what}: "
            f"{share['trainable_encoder_params']:,} of {share['encoder_params']:,} "
            f"({share['fraction']:.2%}); head {share['head_params']:,} "
            f"(with head {share['fraction_with_head']:.2%})"
        )

    # ------------------------------------------------------------ forward

    def train(self, mode: bool = True) -> ClassifyTask:
        """Keep a frozen encoder in eval mode (no dropout / drop-path) while the head (and
        adapters, which have neither) train."""
        super().train(mode)
        if self.hparams.mode in ("linear", "adapter"):
            self.encoder.eval()
        return self

    def embed(self, fbank: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """fbank: (batch, frames, mel_bins) -> pooled clip embedding (batch, dim).

        frames: (batch,) each clip's own frames, read with `ignore_padding` (None: every
        patch is the clip's).
        """
        with torch.set_grad_enabled(self.hparams.mode != "linear" and torch.is_grad_enabled()):
            tokens = self.encoder.forward_features(fbank)
            return self.encoder.pool(tokens, self.hparams.pooling, self.clip_patches(frames))

    def clip_patches(self, frames: torch.Tensor | None) -> torch.Tensor | None:
        """(batch, num_patches) bool of the clips' own patches with `ignore_padding`, else None."""
        if not self.hparams.ignore_padding or frames is None:
            return None
        return self.encoder.clip_patches(frames)

    def forward(self, fbank: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """fbank: (batch, frames, mel_bins), frames (batch,) -> logits (batch, num_classes)."""
        return self.mlp_head(self.embed(fbank, frames))

    def loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """CE against the target distribution (mixup-exact), or BCE per class."""
        if self.hparams.loss == "bce":
            return F.binary_cross_entropy_with_logits(logits, target)
        return F.cross_entropy(logits, target)

    def _checked_batch(
        self, batch: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(fbank, frames or None, float targets) of a batch, checked against the settings."""
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
        if self.hparams.ignore_padding and "frames" not in batch:
            raise ValueError(
                "model.ignore_padding needs batches with 'frames' (each clip's own frame "
                f"count), which ssamba's data modules give; this batch has {sorted(batch)}"
            )
        return batch["fbank"], batch.get("frames"), target.float()

    # ------------------------------------------------------------ steps

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        fbank, frames, target = self._checked_batch(batch)
        loss = self.loss(self(fbank, frames), target)
        self.log(
            "train/loss",
            loss,
            prog_bar=True,
            on_step=True,
            on_epoch=True,
            batch_size=len(target),
            sync_dist=True,  # the epoch mean over every process, as the metrics are
        )
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True)
        return loss

    def _evaluate(self, batch: Mapping[str, Any], stage: str) -> None:
        fbank, frames, target = self._checked_batch(batch)
        logits = self(fbank, frames)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        update_metrics(metrics, logits, target)
        self.log(
            f"{stage}/loss",
            self.loss(logits, target),
            on_epoch=True,
            batch_size=len(target),
            sync_dist=True,
        )
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
        Lightning restores on resume (`ssamba.tasks.schedules`).
        """
        hp = self.hparams
        groups = [{"params": list(self.mlp_head.parameters()), "base_lr": hp.lr * hp.head_lr_mult}]
        if hp.mode != "linear":  # finetune: the encoder; adapter: its adapters only
            trainable = [p for p in self.encoder.parameters() if p.requires_grad]
            groups.insert(0, {"params": trainable, "base_lr": hp.lr})
        for group in groups:
            group["lr"] = group["base_lr"]
        cls = torch.optim.AdamW if hp.optimizer == "adamw" else torch.optim.Adam
        return cls(groups, betas=tuple(hp.betas), weight_decay=hp.weight_decay)

    def on_train_start(self) -> None:
        # Only the cosine schedule needs it; asking Lightning once is enough.
        self._total_steps = float(self.trainer.estimated_stepping_batches)
        if self.logger is not None and self.hparams.mode != "finetune":
            share = self.trainable_share()
            self.logger.log_metrics(
                {
                    "trainable/fraction": share["fraction"],
                    "trainable/params": share["trainable_encoder_params"],
                },
                step=0,
            )

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        hp = self.hparams
        factor = lr_factor(
            self.global_step,
            self.current_epoch,
            schedule=hp.schedule,
            warmup_steps=hp.warmup_steps,
            warmup=hp.warmup,
            decay_start=hp.decay_start,
            decay_every=hp.decay_every,
            decay_gamma=hp.decay_gamma,
            total_steps=getattr(self, "_total_steps", math.inf),
        )
        apply_lr(self.trainer.optimizers, factor)

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
        """What the encoder loader needs to rebuild the classifier from the file alone: the
        exact (resized) encoder config, the features the data module computes and the
        class names in head order."""
        checkpoint["encoder_config"] = self.encoder.cfg.to_dict()
        datamodule = getattr(self.trainer, "datamodule", None)
        fbank = getattr(datamodule, "fbank", None)
        if isinstance(fbank, FbankConfig):
            checkpoint["features"] = fbank.for_inference().to_dict()
        names = getattr(datamodule, "class_names", None)
        if names is not None:
            checkpoint["labels"] = list(names)
        if self.hparams.mode == "adapter":
            # The encoder loader then sees the frozen base encoder (no adapter keys, and no
            # head that means nothing without the adapters); on_load_checkpoint undoes it.
            checkpoint["state_dict"] = _move_keys(
                checkpoint["state_dict"],
                {_ADAPTERS_IN_MODEL: _ADAPTERS_IN_CKPT, _HEAD_IN_MODEL: _HEAD_IN_CKPT},
            )
            checkpoint["adapter_base"] = self.base_reference

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.hparams.mode == "adapter":
            checkpoint["state_dict"] = _move_keys(
                checkpoint["state_dict"],
                {_ADAPTERS_IN_CKPT: _ADAPTERS_IN_MODEL, _HEAD_IN_CKPT: _HEAD_IN_MODEL},
            )

    def on_test_end(self) -> None:
        """Adapter mode: write the tested adapters as an adapter file in the run's folder."""
        if self.hparams.mode == "adapter" and self.trainer.is_global_zero:
            path = self.save_adapter_file(Path(self.trainer.log_dir or ".") / ADAPTER_FILE)
            print(f"adapter file: {path} (base encoder {self.base_reference['path']})")

    def save_adapter_file(self, path: str | Path) -> Path:
        """Adapters + head + labels + base reference (`ssamba.models.adapters`)."""
        if self.hparams.mode != "adapter":
            raise ValueError(f"save_adapter_file: mode is {self.hparams.mode!r}, not adapter")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer else None
        fbank = getattr(datamodule, "fbank", None)
        names = getattr(datamodule, "class_names", None)
        return save_adapter_file(
            path,
            self.encoder,
            self.mlp_head.state_dict(),
            self.base_reference,
            labels=None if names is None else list(names),
            features=fbank.for_inference().to_dict() if isinstance(fbank, FbankConfig) else None,
            extra={
                "pooling": self.hparams.pooling,
                "ignore_padding": self.hparams.ignore_padding,
                "multilabel": self.hparams.multilabel,
            },
        )


def check_features(
    data: FbankConfig, trained: FbankConfig | None, encoder_bins: int, stats: Any = None
) -> None:
    """The data's features must be the kind and size the encoder reads (ValueError if not).

    MFCC-grams need their own normalisation: `data.features.stats: shards` gives the filterbank
    statistics of stats.json, which would scale MFCCs wrongly (`stats`: the data's setting).
    """
    if trained is not None and (trained.kind, trained.feature_dim) != (
        data.kind,
        data.feature_dim,
    ):
        raise ValueError(
            f"model.init: the encoder was trained on {trained.kind} features "
            f"({trained.feature_dim} per frame) but data gives {data.kind} "
            f"({data.feature_dim}); set data.features.kind {trained.kind}"
            + (f" and data.features.num_ceps {trained.num_ceps}" if trained.kind == "mfcc" else "")
        )
    if data.feature_dim != encoder_bins:
        raise ValueError(
            f"data: {data.kind} features give {data.feature_dim} values per frame but the "
            f"encoder reads {encoder_bins} (EncoderConfig.num_mel_bins); set "
            + (
                "model.encoder.num_mel_bins to data.features.num_ceps"
                if data.kind == "mfcc"
                else "them equal"
            )
        )
    if data.kind == "mfcc" and stats == "shards":
        raise ValueError(
            "data.features.stats: 'shards' gives the filterbank mean/std of stats.json, not "
            "MFCC ones; measure them (python -m data_prep stats --shards DIR --kind mfcc) and "
            "set data.features.stats: [mean, std]"
        )


def _move_keys(state: Mapping[str, Any], moves: Mapping[str, str]) -> dict[str, Any]:
    """The state dict with each key's prefix in `moves` replaced by its new prefix."""
    out = {}
    for key, value in state.items():
        for old, new in moves.items():
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    return out
