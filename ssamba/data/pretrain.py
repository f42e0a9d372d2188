"""`PretrainDataModule`: endless, weighted, DDP-safe filterbank batches for MSPM pretraining.

SSAST/SSAMBA pretrain on AudioSet-2M + LibriSpeech-960 (docs/originals.md#pretraining-data).
Here each corpus is a shard folder with a mixing weight; every (rank, worker) resamples shards with its own
seed, so an epoch is simply `steps_per_epoch` batches on every rank (no rank runs dry, DDP
never waits), and validation is a finite, ordered pass over a held-out shard set for the
masked-patch accuracy.

Resuming: checkpoints store the step the stream had reached (`state_dict`), and a resumed
run draws its stream from a seed derived from that step. Restarting with the original
seed would replay the clips of the run's first steps after every interruption (a job
preempted every few hours would train on the same first hours of data again and again).

Batches: `{"fbank": (batch, target_length, num_mel_bins) float32, "frames": (batch,) long,
"id": list[str]}`; `frames` counts each clip's own frames (the rest is padding). With
`augment` (`ssamba.data.augment`) training batches are augmented, and with its
`clean_targets` they also hold `"clean"`: (batch, target_length, num_mel_bins), the same
clips without the mixed-in noise.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, replace
from typing import Any, NotRequired, TypedDict

import lightning as L
import torch

from ssamba.data.augment import AugmentConfig, augment_waves, stretch_bins, stretch_factors
from ssamba.data.loader import (
    FiniteLoader,
    StreamLoader,
    distributed_rank_world,
    make_loader,
    rank_batches,
)
from ssamba.data.shards import Shard, SkipCounter, catalogue, clip_id, list_shards
from ssamba.data.streams import Clip, ClipBatches, MixedShardStream, derive_seed
from ssamba.data.transforms import CropPosition, batch_features, crop_wave, resolve_features
from ssamba.features import DEFAULT_FEATURES, FbankConfig, FeatureConfig

NO_AUGMENT = AugmentConfig()


class ShardSource(TypedDict):
    """One shard set: its folder, its mixing weight, and which splits of it to read."""

    shards: str
    weight: NotRequired[float]
    splits: NotRequired[list[str]]
    ids: NotRequired[list[str]]


@dataclass
class FbankBatch:
    """Crop, augment, filterbank and normalise: clips -> {"fbank": (B, T, F), "frames":
    (B,), "id": [...]}, plus "clean": (B, T, F) with `augment.clean_targets`."""

    cfg: FbankConfig
    crop: CropPosition
    train: bool
    augment: AugmentConfig = NO_AUGMENT

    def __call__(
        self, clips: list[Clip], rng: random.Random
    ) -> tuple[dict[str, Any] | None, list[str]]:
        waves = [crop_wave(c.wave, self.cfg, self.crop, rng) for c in clips]
        augment = self.train and self.augment.active
        clean = waves
        if augment:
            clean, waves = augment_waves(waves, self.augment, self.cfg.sample_rate, rng)
        fbank, frames, kept = batch_features(waves, self.cfg, self.train)
        rejected = [c.id for i, c in enumerate(clips) if i not in kept]
        if not kept:
            return None, rejected
        batch = {"fbank": fbank, "frames": frames, "id": [clips[i].id for i in kept]}
        if self.train and self.augment.clean_targets:
            # the clips' own features; a clean clip is finite whenever its mixture is
            batch["clean"] = batch_features([clean[i] for i in kept], self.cfg, self.train)[0]
        if augment and self.augment.stretch is not None:
            factors = stretch_factors(self.augment, len(kept), rng)
            for key in ("fbank", "clean"):
                if key in batch:
                    batch[key] = torch.stack(
                        [stretch_bins(x, r) for x, r in zip(batch[key], factors, strict=True)]
                    )
        return batch, rejected


def source_shards(source: ShardSource, what: str) -> list[Shard]:
    """The shards a source names; errors name the config key, the folder and the splits.

    With `ids`, only the shards holding those clips, each counted by the clips it holds
    of them (so every listed clip stays equally likely); every id must be found.
    """
    if "shards" not in source:
        raise ValueError(f"{what}: needs a 'shards' folder, got keys {sorted(source)}")
    try:
        shards = list_shards(source["shards"], source.get("splits"))
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(f"{what}: {err}") from err
    if source.get("ids") is None:
        return shards
    wanted = set(map(str, source["ids"]))
    held = {
        s.path: [c for c in catalogue([s], SkipCounter(0)) if clip_id(c) in wanted] for s in shards
    }
    missing = wanted - {clip_id(c) for clips in held.values() for c in clips}
    if missing:
        raise ValueError(
            f"{what}.ids: {len(missing)} of {len(wanted)} ids are not clips of "
            f"{source['shards']} (e.g. {sorted(missing)[0]!r})"
        )
    return [replace(s, count=len(held[s.path])) for s in shards if held[s.path]]


def source_ids(source: ShardSource | None) -> frozenset[str] | None:
    """The clip ids a source keeps (None: all)."""
    ids = None if source is None else source.get("ids")
    return None if ids is None else frozenset(map(str, ids))


class PretrainDataModule(L.LightningDataModule):
    """Weighted, resampled shard streams for pretraining, and a finite validation pass."""

    def __init__(
        self,
        sources: list[ShardSource],
        val: ShardSource | None = None,
        val_max_clips: int | None = None,
        batch_size: int = 24,
        steps_per_epoch: int = 4000,
        num_workers: int = 4,
        shuffle_buffer: int = 1000,
        features: FeatureConfig = DEFAULT_FEATURES,
        augment: AugmentConfig = NO_AUGMENT,
        seed: int = 0,
    ) -> None:
        """
        Args:
            sources: shard sets to mix, e.g. `[{shards: work/shards/audioset, weight: 2},
                {shards: work/shards/librispeech, splits: [train-clean-100]}]`. `weight`
                (default 1) sets the share of clips drawn from that set; `splits` (default
                all) picks tars by split name; `ids` (default all) reads only those clips.
            val: held-out shard set for validation (masked-patch accuracy); read in order,
                every clip once over all ranks (`ids`: only those). None: no validation.
            val_max_clips: keep only the first N validation clips (a fixed, cheap subset).
            batch_size: clips per batch on each rank (validation batches shrink when
                there are too few clips to give every rank one).
            steps_per_epoch: batches per epoch on every rank (SSAST's `epoch_iter`: 4000).
            num_workers: DataLoader worker processes per rank (decode + fbank run there).
            shuffle_buffer: compressed clips each worker holds to shuffle (~170 kB each
                for 10 s); 0 or 1 reads shards in stored order.
            features: the model input (`FeatureConfig`: kind, bins, target_length, stats,
                pad); "shards" statistics and an "auto" length read the stats.json of the
                first source. Longer clips are cropped at a random frame in training;
                saved with the exported encoder's features.
            augment: augmentation of the training inputs (`AugmentConfig`: mixing in
                another clip of the batch at an SNR, gain, time shift, frequency stretch;
                `clean_targets` adds the un-noised clip for the objective's targets). Off
                by default; validation is never augmented.
            seed: base seed of shard draws, mixing and shuffling (each rank and worker
                derives its own).
        """
        super().__init__()
        self.save_hyperparameters()
        # plain data: checkpoints load weights-only
        self.hparams.features = asdict(features)
        self.hparams.augment = asdict(augment)
        if not sources:
            raise ValueError("sources: give at least one shard set")
        self.source_shards = [source_shards(s, f"sources[{i}]") for i, s in enumerate(sources)]
        self.weights = [float(s.get("weight", 1.0)) for s in sources]
        if any(w <= 0 for w in self.weights):
            raise ValueError(f"sources: every weight must be > 0, got {self.weights}")
        self.val_shards = source_shards(val, "val") if val is not None else None
        if batch_size <= 0 or steps_per_epoch <= 0 or num_workers < 0:
            raise ValueError(
                "batch_size and steps_per_epoch must be > 0 and num_workers >= 0, got "
                f"{batch_size}, {steps_per_epoch}, {num_workers}"
            )
        if features.stats == "shards" and len(sources) > 1:
            raise ValueError(
                'data.features.stats: "shards" needs a single source; name a dataset or '
                "give [mean, std]"
            )
        self.fbank: FbankConfig = resolve_features(features, sources[0]["shards"])
        self.augment = augment
        self.train_counter = SkipCounter(num_workers)
        self.val_counter = SkipCounter(num_workers)
        self._place: tuple[int, int] | None = None  # (rank, world size)
        self._resume_step = 0
        self._train: StreamLoader | None = None
        self._val: FiniteLoader | None = None

    def setup(self, stage: str | None = None) -> None:
        """Find this rank (from the trainer when attached) and build its validation loader.

        The training stream is built on first use instead: a resumed run restores
        `load_state_dict` after `setup`, and the stream's seed depends on it.
        """
        if self._place is not None:
            return
        hp = self.hparams
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        else:
            rank, world = distributed_rank_world()
        self._place = (rank, world)
        if self.val_shards is not None:
            clips = catalogue(self.val_shards, self.val_counter)
            keep = source_ids(hp.val)
            if keep is not None:
                clips = [c for c in clips if clip_id(c) in keep]
            clips = clips[: hp.val_max_clips]
            if len(clips) < world:
                raise ValueError(
                    f"val: {len(clips)} readable clips in {hp.val['shards']} for {world} "
                    "processes; every process needs at least one (raise val_max_clips)"
                )
            # Lightning refuses a rank without validation batches: make smaller ones then.
            batch_size = min(hp.batch_size, math.ceil(len(clips) / world))
            batches = ClipBatches(
                clips,
                FbankBatch(self.fbank, "start", train=False),
                batch_size,
                rank,
                world,
                train=False,
                seed=hp.seed,
                counter=self.val_counter,
            )
            length = rank_batches(len(clips), batch_size, rank, world, drop_last=False)
            self._val = FiniteLoader(make_loader(batches, hp.num_workers), length)

    def stream_seed(self) -> int:
        """`seed` for a fresh run; a seed derived from the resumed step after a resume."""
        seed = self.hparams.seed
        return derive_seed(seed, self._resume_step) if self._resume_step else seed

    def train_dataloader(self) -> StreamLoader:
        self.setup("fit")
        assert self._place is not None
        if self._train is None:
            hp = self.hparams
            rank, world = self._place
            stream = MixedShardStream(
                self.source_shards,
                self.weights,
                FbankBatch(self.fbank, "random", train=True, augment=self.augment),
                hp.batch_size,
                hp.shuffle_buffer,
                rank,
                world,
                self.stream_seed(),
                self.train_counter,
                keep=[source_ids(s) for s in hp.sources],
            )
            self._train = StreamLoader(make_loader(stream, hp.num_workers), hp.steps_per_epoch)
        return self._train

    def state_dict(self) -> dict[str, Any]:
        """Saved in every checkpoint: the optimizer step the training stream has reached."""
        return {"stream_step": self.trainer.global_step if self.trainer is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """On resume (before the stream is built): continue with fresh clips from that step."""
        self._resume_step = int(state_dict.get("stream_step", 0))

    def val_dataloader(self) -> FiniteLoader | list:
        self.setup("fit")
        return self._val if self._val is not None else []

    def teardown(self, stage: str | None = None) -> None:
        """Stop the stream's workers when fitting ends (they would idle until collected)."""
        if self._train is not None and stage in (None, "fit"):
            self._train.close()

    def skipped(self) -> dict[str, int]:
        """Corrupt clips skipped so far on this rank, per reason (train + validation)."""
        train, val = self.train_counter.totals(), self.val_counter.totals()
        return {reason: train[reason] + val[reason] for reason in train}
