"""Which spectrogram patches to hide during masked spectrogram patch modelling (MSPM).

Patch models hide blocks of neighbouring patches, so that a masked patch cannot be
recovered by copying its immediate neighbours; frame models, whose "patches" are whole
128-bin columns on a single frequency row, hide plain random patches. Every function
returns bool masks `(batch, num_patches)` with True = masked and exactly `n_masked` True
per row, in the frequency-major token order (index = f * grid_t + t) of
`AudioEncoder.unfold_patches`.

Two kinds of block masking for patch models (`masking=`):

- `"original"` reproduces the distribution the released SSAST/SSAMBA checkpoints were
  pretrained with (SSAST's `gen_maskid_patch`, reused by SSAMBA; docs/originals.md#masking).
  A block of size c starts at a uniformly drawn flat index s and covers
  `s + grid_t * i + j` for i, j < c: it grows only towards higher frequency rows and
  later time, a block that crosses the last time column carries on at the start of the
  next frequency row, indices past the grid are dropped, and patch 0 is never masked.
  Blocks are added until MORE than `n_masked` distinct patches are covered, then the
  `n_masked` lowest indices are kept. Since a block never reaches below its start row,
  the lowest frequency row is masked far less than the others (at 400 of 512 on the
  8 x 64 grid: about 0.42, 0.67, 0.81, 0.87, 0.89, 0.89, 0.89, 0.82 from the lowest row
  up); keeping the lowest indices only trims the top row a little.
- `"uniform"` (the default here) places true c x c squares on the (frequency, time) grid,
  clipped at every edge, with start points drawn from `[-(c-1), size)` on both axes so
  that every patch, corners and patch 0 included, is equally likely to be masked (about
  0.78 in every row at 400 of 512). The excess of the last block is dropped in draw order.

Both draw the cluster size once per clip from `cluster_sizes` ({3, 4, 5}, as the
originals' `randrange(3) + 3`). Frame models use uniform sampling without replacement
whichever kind is asked for, as the originals do.

`mask_generator` seeds a `torch.Generator` from a seed and any ints or strings, with a
hash that is the same in every process, so masks can be keyed by step, micro-batch or
clip id.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Literal, get_args

import torch

__all__ = [
    "MaskingKind",
    "cluster_mask",
    "make_mask",
    "mask_generator",
    "original_cluster_mask",
    "random_mask",
]

MaskingKind = Literal["original", "uniform"]
# A rank larger than any real block or draw order, for "never drawn".
_NEVER = torch.iinfo(torch.long).max


def _check_count(n_masked: int, num_patches: int) -> None:
    if not 0 < n_masked <= num_patches:
        raise ValueError(
            f"n_masked={n_masked} must be between 1 and the number of patches ({num_patches})"
        )


def _check_original_count(n_masked: int, num_patches: int) -> None:
    _check_count(n_masked, num_patches)
    if n_masked > num_patches - 2:
        raise ValueError(
            f"n_masked={n_masked} is too many for masking='original' on {num_patches} "
            f"patches: that rule never masks patch 0 and stops only once more than n_masked "
            f"patches are covered, so at most {num_patches - 2} can be masked"
        )


def _check_sizes(cluster_sizes: Sequence[int]) -> torch.Tensor:
    if not cluster_sizes or min(cluster_sizes) < 1:
        raise ValueError(f"cluster_sizes={tuple(cluster_sizes)} must be positive block sizes")
    return torch.tensor(list(cluster_sizes))


def _block_offsets(c_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column offsets (di, dj) of the cells of a c_max x c_max block, each (c_max^2,)."""
    di, dj = torch.meshgrid(torch.arange(c_max), torch.arange(c_max), indexing="ij")
    return di.reshape(-1), dj.reshape(-1)


def mask_generator(seed: int, *parts: int | str) -> torch.Generator:
    """A CPU generator seeded by `seed` and `parts`, identical in every process and run.

    Python's `hash()` of a string changes with PYTHONHASHSEED, so the key is hashed with
    BLAKE2b instead. Ints and strings are tagged, so `1` and `"1"` give different seeds.
    """
    key = hashlib.blake2b(digest_size=8)
    for part in (seed, *parts):
        if isinstance(part, bool) or not isinstance(part, int | str):
            raise TypeError(f"mask_generator parts must be ints or strings, got {part!r}")
        tag = "i" if isinstance(part, int) else "s"
        text = str(part).encode()
        key.update(f"{tag}{len(text)}:".encode() + text)
    return torch.Generator().manual_seed(int.from_bytes(key.digest(), "little") >> 1)


def random_mask(
    batch: int,
    num_patches: int,
    n_masked: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask `n_masked` patches per clip uniformly at random (frame models).

    Returns: (batch, num_patches) bool, exactly `n_masked` True per row.
    """
    _check_count(n_masked, num_patches)
    order = torch.rand(batch, num_patches, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, order[:, :n_masked], True)
    return mask.to(device) if device is not None else mask


def cluster_mask(
    batch: int,
    grid: tuple[int, int],
    n_masked: int,
    cluster_sizes: Sequence[int] = (3, 4, 5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Mask square blocks clipped at the grid edges, every patch equally likely ("uniform").

    Each clip draws one block size c from `cluster_sizes`, then c x c blocks at random
    positions are added until `n_masked` distinct patches are covered; the first
    `n_masked` patches in draw order are kept. All clips are drawn together: each round
    draws a fixed number of blocks for every clip and only repeats while some clip is
    still short, which is rare after the first round.

    grid: (freq_patches, time_patches).
    Returns: (batch, freq_patches * time_patches) bool, exactly `n_masked` True per row.
    """
    grid_f, grid_t = grid
    num_patches = grid_f * grid_t
    _check_count(n_masked, num_patches)
    sizes = _check_sizes(cluster_sizes)
    c = sizes[torch.randint(len(sizes), (batch,), generator=generator)]  # (batch,)
    c_max = int(sizes.max())
    # Offsets of the largest block; per clip, offsets outside its own c x c are invalid.
    di, dj = _block_offsets(c_max)
    in_block = (di[None] < c[:, None]) & (dj[None] < c[:, None])  # (batch, c_max^2)
    # Enough blocks that one round almost always suffices even at ~80% masking.
    per_round = math.ceil(3 * n_masked / min(cluster_sizes) ** 2) + 8

    first_hit = torch.full((batch, num_patches), _NEVER, dtype=torch.long)
    drawn = 0
    while True:
        # Start points from -(c-1) so blocks overlapping an edge are as likely as any.
        f0 = torch.randint(0, grid_f + c_max - 1, (batch, per_round), generator=generator)
        t0 = torch.randint(0, grid_t + c_max - 1, (batch, per_round), generator=generator)
        f0 = f0 - (c[:, None] - 1)
        t0 = t0 - (c[:, None] - 1)
        f = f0[:, :, None] + di[None, None]  # (batch, per_round, c_max^2)
        t = t0[:, :, None] + dj[None, None]
        valid = in_block[:, None] & (f >= 0) & (f < grid_f) & (t >= 0) & (t < grid_t)
        index = (f * grid_t + t).clamp(0, num_patches - 1).reshape(batch, -1)
        rank = drawn + torch.arange(index.shape[1]).expand(batch, -1)
        rank = torch.where(valid.reshape(batch, -1), rank, _NEVER)
        first_hit.scatter_reduce_(1, index, rank, reduce="amin")
        drawn += index.shape[1]
        if bool(((first_hit < _NEVER).sum(dim=1) >= n_masked).all()):
            break
    keep = first_hit.argsort(dim=1, stable=True)[:, :n_masked]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    return mask.to(device) if device is not None else mask


def original_cluster_mask(
    batch: int,
    grid: tuple[int, int],
    n_masked: int,
    cluster_sizes: Sequence[int] = (3, 4, 5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The originals' block masking, vectorised over the batch ("original").

    Per clip, one block size c; blocks start at flat indices s drawn uniformly from
    [0, num_patches) and cover `s + grid_t * i + j` (i, j < c) that lie in
    [1, num_patches); blocks are added until more than `n_masked` distinct patches are
    covered, and the `n_masked` lowest indices are kept. This is the same distribution
    as drawing one block at a time: blocks are drawn a round at a time, each patch
    records the first block that covered it, and the block at which a clip's count
    first exceeds `n_masked` is where that clip's sequential loop would have stopped.

    grid: (freq_patches, time_patches).
    Returns: (batch, freq_patches * time_patches) bool, exactly `n_masked` True per row.
    """
    grid_f, grid_t = grid
    num_patches = grid_f * grid_t
    _check_original_count(n_masked, num_patches)
    sizes = _check_sizes(cluster_sizes)
    c = sizes[torch.randint(len(sizes), (batch,), generator=generator)]  # (batch,)
    di, dj = _block_offsets(int(sizes.max()))
    in_block = (di[None] < c[:, None]) & (dj[None] < c[:, None])  # (batch, c_max^2)
    offset = di * grid_t + dj  # flat offsets: a row of the block past grid_t wraps
    per_round = math.ceil(3 * n_masked / min(cluster_sizes) ** 2) + 8

    first_block = torch.full((batch, num_patches), _NEVER, dtype=torch.long)
    drawn = 0
    while True:
        start = torch.randint(0, num_patches, (batch, per_round), generator=generator)
        cells = start[:, :, None] + offset[None, None]  # (batch, per_round, c_max^2)
        valid = in_block[:, None] & (cells > 0) & (cells < num_patches)
        block = drawn + torch.arange(per_round)[None, :, None]
        block = torch.where(valid, block, _NEVER).reshape(batch, -1)
        index = cells.clamp(0, num_patches - 1).reshape(batch, -1)
        first_block.scatter_reduce_(1, index, block, reduce="amin")
        drawn += per_round
        # The loop stops after the block that covers the (n_masked + 1)-th patch.
        stop = first_block.kthvalue(n_masked + 1, dim=1).values  # (batch,)
        if bool((stop < _NEVER).all()):
            break
    covered = first_block <= stop[:, None]  # more than n_masked per row
    mask = covered & (covered.cumsum(dim=1) <= n_masked)  # its n_masked lowest indices
    return mask.to(device) if device is not None else mask


def make_mask(
    batch: int,
    grid: tuple[int, int],
    n_masked: int,
    cluster_sizes: Sequence[int] = (3, 4, 5),
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    device: torch.device | str | None = None,
    *,
    masking: MaskingKind = "uniform",
) -> torch.Tensor:
    """Block masks for patch models (of the given kind), random masks for frame models.

    A frame model's patch spans every mel bin (fshape == num_mel_bins), so its grid has a
    single frequency row and blocks make no sense there; like the originals, it gets
    uniform sampling whatever `masking` says.

    generator: one generator for the whole batch, or one per clip (a sequence of length
        `batch`): row i is then drawn from generator i alone, so a clip keyed by its own
        generator gets the same mask whatever batch, position or rank it comes in.
    Returns: (batch, grid[0] * grid[1]) bool, exactly `n_masked` True per row.
    """
    if masking not in get_args(MaskingKind):
        raise ValueError(f"masking={masking!r} must be one of {get_args(MaskingKind)}")
    if generator is not None and not isinstance(generator, torch.Generator):
        generators = list(generator)
        if len(generators) != batch:
            raise ValueError(f"{len(generators)} generators for a batch of {batch} clips")
        rows = [make_mask(1, grid, n_masked, cluster_sizes, g, masking=masking) for g in generators]
        mask = torch.cat(rows) if rows else torch.zeros(0, grid[0] * grid[1], dtype=torch.bool)
        return mask.to(device) if device is not None else mask
    if grid[0] == 1:
        mask = random_mask(batch, grid[1], n_masked, generator=generator)
    elif masking == "original":
        mask = original_cluster_mask(batch, grid, n_masked, cluster_sizes, generator=generator)
    else:
        mask = cluster_mask(batch, grid, n_masked, cluster_sizes, generator=generator)
    return mask.to(device) if device is not None else mask
