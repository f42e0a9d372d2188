"""Spectrogram patches: the patch grid, the patch embedding, raw patches, position-grid resizing.

Shared by every encoder family. Token order is frequency-major (index = f * grid_t + t),
which is what `Conv2d(...).flatten(2)` and `nn.Unfold` both produce on (batch, 1, F, T).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


def patch_grid(
    size: tuple[int, int], patch: tuple[int, int], stride: tuple[int, int]
) -> tuple[int, int]:
    """(freq_patches, time_patches) a Conv2d of kernel `patch` and `stride` gives on `size`=(F, T)."""
    return tuple((n - p) // s + 1 for n, p, s in zip(size, patch, stride, strict=True))


class PatchEmbed(nn.Module):
    """Linear patch projection: (batch, 1, F, T) -> (batch, patches, dim), frequency-major."""

    def __init__(self, patch: tuple[int, int], stride: tuple[int, int], dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(1, dim, kernel_size=patch, stride=stride)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def unfold_patches(spec: Tensor, patch: tuple[int, int], stride: tuple[int, int]) -> Tensor:
    """Raw input patches in token order: (batch, 1, F, T) -> (batch, patches, patch_f * patch_t).

    The same values `nn.Unfold(kernel_size=patch, stride=stride)` gives SSAST as targets.
    """
    return F.unfold(spec, kernel_size=patch, stride=stride).transpose(1, 2)


def resize_pos_grid(
    pos: Tensor, old: tuple[int, int], new: tuple[int, int], antialias: bool = False
) -> Tensor:
    """Adapt a learned position grid to a new patch grid: (1, old_f*old_t, D) -> (1, new_f*new_t, D).

    SSAST/SSAMBA (default): per axis, time first then frequency, a smaller axis is cropped
    around the centre (start = old//2 - new//2), a larger one bilinearly interpolated
    (align_corners=False). AuM (`antialias=True`): both axes bilinearly resampled with
    antialiasing, shrinking as well as growing (timm's resample_abs_pos_embed).
    Equal grids return `pos` unchanged.

    The originals interpolate time to a hard-coded (8, t) and end the frequency crop at
    `start + t_dim` (a typo for f_dim). For the 8-row grid of every released 16x16
    checkpoint both coincide with this code; for other grids they are bugs (a wrong shape
    or a crash), so they are not reproduced.
    """
    if tuple(old) == tuple(new):
        return pos
    dim = pos.shape[-1]
    grid = pos.reshape(1, old[0], old[1], dim).permute(0, 3, 1, 2)  # (1, D, f, t)
    if antialias:
        grid = F.interpolate(
            grid.float(), size=tuple(new), mode="bilinear", antialias=True, align_corners=False
        ).to(pos.dtype)
    else:
        grid = _fit_axis(grid, axis=3, new=new[1])
        grid = _fit_axis(grid, axis=2, new=new[0])
    return grid.permute(0, 2, 3, 1).reshape(1, new[0] * new[1], dim)


def _fit_axis(grid: Tensor, axis: int, new: int) -> Tensor:
    """Crop around the centre or bilinearly stretch one axis of (1, D, f, t) to `new`."""
    old = grid.shape[axis]
    if new < old:
        start = old // 2 - new // 2
        return grid.narrow(axis, start, new)
    if new == old:
        return grid
    size = list(grid.shape[2:])
    size[axis - 2] = new
    return F.interpolate(grid, size=tuple(size), mode="bilinear", align_corners=False)
