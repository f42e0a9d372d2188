"""The two IterableDatasets behind both DataModules; they yield whole batches from workers.

- `ClipBatches`: a finite, indexed list of clips (`ClipRef`s). Evaluation reads it in
  order; training reshuffles it every epoch (same permutation on every rank) and drops the
  last partial batch so ranks step together. Each (rank, worker) reads only its batches
  (`loader.batch_plan`), seeking straight to each clip.
- `MixedShardStream`: an endless stream over one or more shard sets, drawn by weight, for
  pretraining. Each (rank, worker) resamples shards with its own seed, so no node or
  worker splitting is needed and no rank can run dry, whatever the shard count.

Both decode in the worker, skip and count corrupt clips (`SkipCounter`), and hand the
good ones to a `BatchBuilder`, which crops, augments and computes filterbanks.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch.utils.data import IterableDataset

from ssamba.data.loader import Slot, batch_plan
from ssamba.data.shards import (
    ClipReader,
    ClipRef,
    CorruptClip,
    RawClip,
    Shard,
    ShardError,
    SkipCounter,
    decode_clip,
    iter_shard,
)


@dataclass
class Clip:
    """A decoded clip: its id, wave (samples,) float32 at 16 kHz, and its json metadata."""

    id: str
    wave: torch.Tensor
    meta: dict[str, Any]


class BatchBuilder(Protocol):
    """Turns decoded clips into one batch dict; returns (batch or None, ids it rejected)."""

    def __call__(
        self, clips: list[Clip], rng: random.Random
    ) -> tuple[dict[str, Any] | None, list[str]]: ...


def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers; hashing int tuples is stable across processes."""
    return hash(tuple(parts)) & (2**63 - 1)


def seed_worker_torch(seed: int) -> None:
    """Seed torch's global RNG (SpecAugment uses it) inside DataLoader workers only.

    Lightning seeds every rank alike, so without this worker 0 of every rank would draw
    identical masks. The main process is left alone: reseeding it would reset training.
    """
    if torch.utils.data.get_worker_info() is not None:
        torch.manual_seed(seed)


def _decode_or_count(raw: RawClip, counter: SkipCounter, slot: Slot) -> Clip | None:
    try:
        wave, meta = decode_clip(raw)
    except CorruptClip as err:
        counter.add(slot.worker, err)
        return None
    return Clip(str(meta["id"]), wave, meta)


def _count_rejected(ids: list[str], counter: SkipCounter, slot: Slot) -> None:
    for clip_id in ids:
        counter.add(slot.worker, CorruptClip("non_finite", f"{clip_id}: non-finite filterbank"))


class ClipBatches(IterableDataset):
    """Batches over a fixed clip list; see the module docstring for who reads what.

    `epoch` is a shared-memory tensor set by `FiniteLoader` before each pass (so persistent
    workers see it); with `train`, it seeds the permutation.
    """

    def __init__(
        self,
        clips: Sequence[ClipRef],
        builder: BatchBuilder,
        batch_size: int,
        rank: int,
        world: int,
        train: bool,
        seed: int,
        counter: SkipCounter,
    ) -> None:
        self.clips = list(clips)
        self.builder = builder
        self.batch_size = batch_size
        self.rank, self.world = rank, world
        self.train = train
        self.seed = seed
        self.counter = counter
        self.epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = Slot.current(self.rank, self.world)
        epoch = int(self.epoch)
        order = list(range(len(self.clips)))
        if self.train:
            random.Random(derive_seed(self.seed, epoch)).shuffle(order)  # same on every rank
        rng = random.Random(derive_seed(self.seed, epoch, slot.index))
        seed_worker_torch(derive_seed(self.seed, epoch, slot.index, 1))
        reader = ClipReader()
        try:
            for start, stop in batch_plan(len(order), self.batch_size, slot, self.train):
                decoded = (
                    _decode_or_count(reader.read(self.clips[i]), self.counter, slot)
                    for i in order[start:stop]
                )
                batch, rejected = self.builder([c for c in decoded if c is not None], rng)
                _count_rejected(rejected, self.counter, slot)
                if batch is not None:
                    yield batch
        finally:
            reader.close()


class MixedShardStream(IterableDataset):
    """Endless batches drawn from several shard sets with mixing `weights`.

    Per clip, a source is picked with probability weight / sum(weights); within a source,
    shards are drawn with probability proportional to their clip count (so every clip is
    equally likely, however unevenly the last shards are filled) and read front to back;
    a shuffle buffer of `shuffle_buffer` raw (still compressed) clips decorrelates them.
    """

    def __init__(
        self,
        sources: Sequence[Sequence[Shard]],
        weights: Sequence[float],
        builder: BatchBuilder,
        batch_size: int,
        shuffle_buffer: int,
        rank: int,
        world: int,
        seed: int,
        counter: SkipCounter,
        keep: Sequence[frozenset[str] | None] | None = None,
    ) -> None:
        """`keep`: per source, the clip ids to read (None: every clip of its shards)."""
        self.sources = [list(shards) for shards in sources]
        self.keep = list(keep) if keep is not None else [None] * len(self.sources)
        self.weights = list(weights)
        self.builder = builder
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.rank, self.world = rank, world
        self.seed = seed
        self.counter = counter

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot = Slot.current(self.rank, self.world)
        rng = random.Random(derive_seed(self.seed, slot.index))
        seed_worker_torch(derive_seed(self.seed, slot.index, 1))
        streams = [
            self._resampled(shards, rng, slot, keep)
            for shards, keep in zip(self.sources, self.keep, strict=True)
        ]
        pending: list[Clip] = []
        for raw in _shuffled(_mixed(streams, self.weights, rng), self.shuffle_buffer, rng):
            clip = _decode_or_count(raw, self.counter, slot)
            if clip is not None:
                pending.append(clip)
            if len(pending) == self.batch_size:
                batch, rejected = self.builder(pending, rng)
                _count_rejected(rejected, self.counter, slot)
                pending = []
                if batch is not None:
                    yield batch

    def _resampled(
        self, shards: list[Shard], rng: random.Random, slot: Slot, keep: frozenset[str] | None
    ) -> Iterator[RawClip]:
        """Clips of shards (those in `keep` when given) drawn with replacement, forever;
        broken shards are counted."""
        counts = [shard.count or 1 for shard in shards]
        failures_in_a_row = 0
        while True:
            shard = rng.choices(shards, counts)[0]
            try:
                for raw in iter_shard(shard.path):
                    failures_in_a_row = 0
                    if keep is None or raw_id(raw) in keep:
                        yield raw
            except ShardError as err:
                self.counter.add(slot.worker, CorruptClip("bad_shard", str(err)))
                failures_in_a_row += 1
                if failures_in_a_row > 10 * len(shards):
                    raise RuntimeError(
                        f"{failures_in_a_row} shard reads in a row failed, e.g. {err}"
                    ) from err


def raw_id(raw: RawClip) -> str:
    """A stored clip's id: its json `id`, else its key (as `decode_clip` sets it)."""
    return str((raw.meta or {}).get("id", raw.key))


def _mixed(
    streams: list[Iterator[RawClip]], weights: list[float], rng: random.Random
) -> Iterator[RawClip]:
    """Endless clips, each from a stream picked with probability proportional to its weight."""
    while True:
        yield next(rng.choices(streams, weights)[0])


def _shuffled(items: Iterator[RawClip], size: int, rng: random.Random) -> Iterator[RawClip]:
    """Reservoir-style shuffle: hold `size` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buffer: list[RawClip] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        index = rng.randrange(size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer
