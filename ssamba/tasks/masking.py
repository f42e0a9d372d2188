"""Which spectrogram patches to hide during masked spectrogram patch modelling (MSPM).

SSAST (and SSAMBA, which reuses it) hides square c x c blocks of patches for patch
models, so a masked patch cannot be recovered by copying its immediate neighbours, and
plain random patches for frame models, whose "patches" are whole 128-bin columns. Both
return bool masks `(batch, num_patches)` with True = masked and exactly `n_masked` True
per row, in the frequency-major token order (index = f * grid_t + t) of
`AudioEncoder.unfold_patches`.

Differences from the originals' `gen_maskid_patch`, chosen on purpose:
- Blocks are true 2-D squares clipped at every grid edge. The original adds
  `start + grid_t * i + j`, so a block that crosses the last time column wraps onto the
  next frequency row, and `mask_cand > 0` means patch 0 is never masked. Neither helps
  the objective; with start points drawn from `[-(c-1), size)` on both axes every patch
  is equally likely to be masked.
- The excess of the last block is dropped in draw order. The original truncates
  `list(set(ids))[:n]`, which for small ints is ascending order and so always spares the
  highest-frequency patches.
Kept as in the originals: the cluster size is drawn once per clip from {3, 4, 5}, blocks
are added until at least `n_masked` distinct patches are covered, and frame models use
uniform sampling without replacement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

__all__ = ["cluster_mask", "make_mask", "random_mask"]


def _check_count(n_masked: int, num_patches: int) -> None:
    if not 0 < n_masked <= num_patches:
        raise ValueError(
            f"n_masked={n_masked} must be between 1 and the number of patches ({num_patches})"
        )


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
    """Mask square blocks of patches on the (frequency, time) patch grid (patch models).

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
    if not cluster_sizes or min(cluster_sizes) < 1:
        raise ValueError(f"cluster_sizes={tuple(cluster_sizes)} must be positive block sizes")
    sizes = torch.tensor(list(cluster_sizes))
    c = sizes[torch.randint(len(sizes), (batch,), generator=generator)]  # (batch,)
    c_max = int(sizes.max())
    # Offsets of the largest block; per clip, offsets outside its own c x c are invalid.
    di, dj = torch.meshgrid(torch.arange(c_max), torch.arange(c_max), indexing="ij")
    di, dj = di.reshape(-1), dj.reshape(-1)  # (c_max^2,)
    in_block = (di[None] < c[:, None]) & (dj[None] < c[:, None])  # (batch, c_max^2)
    # Enough blocks that one round almost always suffices even at ~80% masking.
    per_round = math.ceil(3 * n_masked / min(cluster_sizes) ** 2) + 8

    never = torch.iinfo(torch.long).max
    first_hit = torch.full((batch, num_patches), never, dtype=torch.long)
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
        rank = torch.where(valid.reshape(batch, -1), rank, never)
        first_hit.scatter_reduce_(1, index, rank, reduce="amin")
        drawn += index.shape[1]
        if bool(((first_hit < never).sum(dim=1) >= n_masked).all()):
            break
    keep = first_hit.argsort(dim=1, stable=True)[:, :n_masked]
    mask = torch.zeros(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, keep, True)
    return mask.to(device) if device is not None else mask


def make_mask(
    batch: int,
    grid: tuple[int, int],
    n_masked: int,
    cluster_sizes: Sequence[int] = (3, 4, 5),
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The originals' rule: cluster masking for patch models, random for frame models.

    A frame model's patch spans every mel bin (fshape == num_mel_bins), so its grid has a
    single frequency row and square blocks make no sense there.

    Returns: (batch, grid[0] * grid[1]) bool.
    """
    if grid[0] == 1:
        return random_mask(batch, grid[1], n_masked, generator=generator, device=device)
    return cluster_mask(batch, grid, n_masked, cluster_sizes, generator=generator, device=device)
