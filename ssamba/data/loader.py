"""Who reads what under DDP x DataLoader workers, and loaders with a fixed length per rank.

Every rank runs the same DataLoader code with `num_workers` processes, so each piece of
data has a *slot*: (rank, worker). `Slot.current` finds it from the rank/world size the
DataModule was given (Lightning's `trainer.global_rank` / `world_size`, or an initialised
process group) and the worker info of the process it runs in.

- Finite reads (evaluation, labelled training) cut the clip list into batches and deal
  batch j to rank j % world, then to that rank's workers in turn. Torch's DataLoader
  collects batches from its workers round-robin, so each rank sees its batches in global
  order; counts differ by at most one batch between ranks and nothing is padded or
  repeated, so metrics gathered over ranks count every clip exactly once.
- Infinite streams (pretraining) run one independent seed per slot; `StreamLoader` takes
  exactly `steps` batches per epoch from one persistent iterator, so every rank steps
  the same number of times however the shards fall.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info


@dataclass(frozen=True)
class Slot:
    """This reader's place: `rank` of `world` processes, `worker` of `workers` per rank."""

    rank: int
    world: int
    worker: int
    workers: int

    @property
    def index(self) -> int:
        """A number unique over all ranks and workers (seeds, logs)."""
        return self.rank * self.workers + self.worker

    @staticmethod
    def current(rank: int, world: int) -> Slot:
        """The slot of the calling process (worker 0 of 1 when not in a DataLoader worker)."""
        info = get_worker_info()
        if info is None:
            return Slot(rank, world, 0, 1)
        return Slot(rank, world, info.id, info.num_workers)


def distributed_rank_world() -> tuple[int, int]:
    """(rank, world size) of an initialised process group, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def batch_plan(
    num_clips: int, batch_size: int, slot: Slot, drop_last: bool
) -> list[tuple[int, int]]:
    """[start, stop) index ranges of the batches this slot reads, in the order it yields them.

    Batch j covers clips [j*B, (j+1)*B); it belongs to rank j % world and, among that
    rank's batches, to worker (j // world) % workers. `drop_last` (training) drops the
    final partial batch and trims every rank to the same count (`rank_batches`), so DDP
    ranks step together; without it (evaluation) every clip is read exactly once.
    """
    if drop_last:
        limit = rank_batches(num_clips, batch_size, slot.rank, slot.world, True) * slot.world
    else:
        limit = math.ceil(num_clips / batch_size)
    plan = []
    for j in range(slot.rank, limit, slot.world):
        if (j // slot.world) % slot.workers == slot.worker:
            plan.append((j * batch_size, min((j + 1) * batch_size, num_clips)))
    return plan


def rank_batches(num_clips: int, batch_size: int, rank: int, world: int, drop_last: bool) -> int:
    """Batches `rank` yields: the same on every rank with `drop_last`, else its exact share."""
    if drop_last:
        return num_clips // batch_size // world
    return len(range(rank, math.ceil(num_clips / batch_size), world))


class StreamLoader:
    """Exactly `steps` batches per epoch (`len` = steps) from an infinite stream.

    One iterator lives across epochs, so shuffle buffers and open shards carry on and no
    worker restarts; every rank yields the same number of batches, whatever the shards.
    """

    def __init__(self, loader: DataLoader, steps: int) -> None:
        if steps <= 0:
            raise ValueError(f"steps_per_epoch must be > 0, got {steps}")
        self.loader = loader
        self.steps = steps
        self._iterator: Iterator[Any] | None = None
        weakref.finalize(self, shutdown_workers, loader)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Any]:
        if self._iterator is None:
            self._iterator = iter(self.loader)
        for _ in range(self.steps):
            yield next(self._iterator)

    def close(self) -> None:
        """Stop the workers now (the stream restarts if iterated again)."""
        self._iterator = None
        shutdown_workers(self.loader)


def shutdown_workers(loader: DataLoader) -> None:
    """Stop a DataLoader's persistent workers now.

    Left to garbage collection inside a reference cycle (Lightning's trainer <->
    datamodule), the workers' iterator waits out a 5 s join timeout per worker. Both
    loaders below call this from a `weakref.finalize`, which runs while everything is
    still intact. Uses the DataLoader's private `_iterator`: there is no public handle.
    """
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
    loader._iterator = None


class FiniteLoader:
    """One pass per epoch over a finite dataset; `len` = batches this rank yields.

    Before each pass it stores the epoch number where the workers read it
    (`dataset.epoch`, a shared-memory tensor), so training reshuffles every epoch even with
    persistent workers, whose dataset copies never see attribute changes made here.
    """

    def __init__(self, loader: DataLoader, length: int) -> None:
        self.loader = loader
        self.length = length
        self.epoch = 0
        weakref.finalize(self, shutdown_workers, loader)

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[Any]:
        self.loader.dataset.epoch.fill_(self.epoch)  # type: ignore[attr-defined]
        self.epoch += 1
        return iter(self.loader)


def make_loader(dataset: IterableDataset, num_workers: int) -> DataLoader:
    """A DataLoader over a dataset that already yields whole batches.

    Collation happens in the workers (one stacked tensor per batch crosses the process
    boundary, not B small ones); memory is pinned only when CUDA can use it; workers
    persist across epochs so they do not re-import and re-open shards every epoch.
    """
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
        prefetch_factor=2 if num_workers > 0 else None,
    )
