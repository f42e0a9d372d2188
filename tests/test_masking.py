"""Masks for masked spectrogram patch modelling: counts, clustering, seeding, frame models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssamba.tasks.masking import cluster_mask, make_mask, random_mask

# (grid, n_masked): the originals' 8 x 64 grid at their mask counts, the FSDD recipe's
# 8 x 4 grid, and a square fine-tuning-like grid.
CASES = [((8, 64), 400), ((8, 64), 250), ((8, 64), 100), ((8, 4), 20), ((12, 12), 50)]


def masked_neighbours(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per clip: mean number of masked 4-neighbours of a masked patch. mask: (B, F*T)."""
    m = mask.view(-1, *grid).float()
    p = F.pad(m, (1, 1, 1, 1))
    neighbours = p[:, :-2, 1:-1] + p[:, 2:, 1:-1] + p[:, 1:-1, :-2] + p[:, 1:-1, 2:]
    return (neighbours * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2))


@pytest.mark.parametrize(("grid", "n_masked"), CASES)
def test_every_clip_gets_exactly_n_masked_distinct_patches(grid, n_masked):
    generator = torch.Generator().manual_seed(0)
    num_patches = grid[0] * grid[1]
    for mask in (
        cluster_mask(64, grid, n_masked, generator=generator),
        random_mask(64, num_patches, n_masked, generator=generator),
    ):
        assert mask.dtype == torch.bool
        assert mask.shape == (64, num_patches)
        assert mask.sum(dim=1).tolist() == [n_masked] * 64
        # the encoder and the loss gather masked positions by index: in range, no repeats
        indices = mask.nonzero()[:, 1].view(64, n_masked)
        assert int(indices.min()) >= 0 and int(indices.max()) < num_patches
        assert all(len(set(row.tolist())) == n_masked for row in indices)


@pytest.mark.parametrize(("grid", "n_masked"), CASES)
def test_cluster_masks_have_more_masked_neighbours_than_random_masks(grid, n_masked):
    generator = torch.Generator().manual_seed(1)
    clustered = masked_neighbours(cluster_mask(256, grid, n_masked, generator=generator), grid)
    scattered = masked_neighbours(
        random_mask(256, grid[0] * grid[1], n_masked, generator=generator), grid
    )
    assert clustered.mean() > scattered.mean() + 0.3
    assert (clustered > scattered).float().mean() > 0.9


def test_blocks_follow_the_cluster_size():
    # 1 x 1 blocks are single patches: clustering disappears, like random masking
    generator = torch.Generator().manual_seed(2)
    grid, n = (8, 64), 100
    singles = masked_neighbours(cluster_mask(256, grid, n, (1,), generator=generator), grid)
    scattered = masked_neighbours(random_mask(256, 512, n, generator=generator), grid)
    squares = masked_neighbours(cluster_mask(256, grid, n, (5,), generator=generator), grid)
    assert abs(float(singles.mean() - scattered.mean())) < 0.1
    assert squares.mean() > singles.mean() + 1.0


def test_every_patch_is_equally_likely_to_be_masked_edges_included():
    # The originals never mask patch 0 and wrap blocks across the time edge; here blocks
    # may start off-grid, so corners and edges are masked as often as the centre.
    generator = torch.Generator().manual_seed(3)
    grid, n = (8, 16), 40
    rate = cluster_mask(4000, grid, n, generator=generator).float().mean(dim=0)
    expected = n / (grid[0] * grid[1])
    assert float((rate / expected).min()) > 0.8
    assert float((rate / expected).max()) < 1.2
    assert float(rate[0]) > 0.8 * expected  # the first patch, never masked by the originals


def test_a_seeded_generator_repeats_its_masks_and_another_seed_does_not():
    def draw(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return (
            cluster_mask(8, (8, 64), 300, generator=generator),
            random_mask(8, 512, 300, generator=generator),
        )

    first, again, other = draw(7), draw(7), draw(8)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not any(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_frame_models_get_random_masks_patch_models_cluster_masks():
    # A frame model's patch spans all mel bins: its grid is 1 x T, where blocks make no sense.
    seed, n = 11, 100
    frame = make_mask(32, (1, 512), n, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(
        frame, random_mask(32, 512, n, generator=torch.Generator().manual_seed(seed))
    )

    patch = make_mask(32, (8, 64), n, generator=torch.Generator().manual_seed(seed))
    clustered = cluster_mask(32, (8, 64), n, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(patch, clustered)


def test_masking_every_patch_or_one_patch_works():
    generator = torch.Generator().manual_seed(4)
    assert bool(cluster_mask(3, (8, 4), 32, generator=generator).all())
    assert cluster_mask(3, (8, 4), 1, generator=generator).sum(dim=1).tolist() == [1, 1, 1]


@pytest.mark.parametrize("n_masked", [0, 33])
def test_impossible_counts_name_the_setting_and_the_patch_count(n_masked):
    with pytest.raises(ValueError, match=rf"n_masked={n_masked}.*\(32\)"):
        cluster_mask(2, (8, 4), n_masked)
    with pytest.raises(ValueError, match=rf"n_masked={n_masked}"):
        random_mask(2, 32, n_masked)


def test_masks_are_made_on_the_requested_device():
    mask = make_mask(2, (8, 4), 5, device="meta")
    assert mask.device.type == "meta"
