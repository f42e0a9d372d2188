"""Masks for masked spectrogram patch modelling: counts, clustering, the originals' distribution,
seeding, frame models."""

from __future__ import annotations

import random
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from ssamba.tasks.masking import cluster_mask, make_mask, mask_generator, random_mask

# (grid, n_masked): the originals' 8 x 64 grid at their mask counts, the FSDD recipe's
# 8 x 4 grid, and a square fine-tuning-like grid.
CASES = [((8, 64), 400), ((8, 64), 250), ((8, 64), 100), ((8, 4), 20), ((12, 12), 50)]
# mask_generator(0, "val", "clip-1").initial_seed(): pinned, so a change of the hash (which
# would silently change every run's masks) fails here.
MASK_GENERATOR_GOLDEN = 2262910024991253979


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


# ---- masking="original": the released checkpoints' distribution ------------------------

# Per-frequency-row masking rate of the originals at 400 of 512 on the 8 x 64 grid, lowest
# row first (docs/originals.md#masking): blocks only grow upwards from their start row.
ORIGINAL_ROW_RATES_400 = [0.42, 0.67, 0.81, 0.87, 0.89, 0.89, 0.89, 0.82]


def reference_original_mask(
    rng: random.Random,
    grid: tuple[int, int],
    n_masked: int,
    cluster_sizes: tuple[int, ...] = (3, 4, 5),
) -> list[int]:
    """The originals' masking loop for one clip, one block at a time, in plain Python.

    Returns the masked indices, as the originals' truncation `list(set)[:n]` gives them.
    """
    grid_f, grid_t = grid
    num_patches = grid_f * grid_t
    c = cluster_sizes[rng.randrange(len(cluster_sizes))]
    covered: set[int] = set()
    while len(covered) <= n_masked:  # stops only once MORE than n_masked are covered
        start = rng.randrange(num_patches)
        for i in range(c):
            for j in range(c):
                cell = start + grid_t * i + j  # past the last time column: the next row
                if 0 < cell < num_patches:
                    covered.add(cell)
    return list(covered)[:n_masked]


def row_rates(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Fraction of masked patches per frequency row, lowest row first. mask: (B, F*T)."""
    return mask.view(-1, *grid).float().mean(dim=(0, 2))


def as_mask(rows: list[list[int]], num_patches: int) -> torch.Tensor:
    mask = torch.zeros(len(rows), num_patches, dtype=torch.bool)
    for i, row in enumerate(rows):
        mask[i, row] = True
    return mask


def test_original_masking_reproduces_the_released_row_rates_and_spares_patch_0():
    generator = torch.Generator().manual_seed(20)
    mask = make_mask(2000, (8, 64), 400, generator=generator, masking="original")
    rates = row_rates(mask, (8, 64))
    assert torch.allclose(rates, torch.tensor(ORIGINAL_ROW_RATES_400), atol=0.03), rates
    assert not bool(mask[:, 0].any())
    # the lowest row is the least masked, far below the ~0.78 of uniform masking
    assert int(rates.argmin()) == 0 and float(rates[0]) < 0.5


def test_uniform_masking_masks_every_row_equally_and_is_the_default():
    grid, n = (8, 64), 400
    uniform = make_mask(500, grid, n, generator=torch.Generator().manual_seed(21))
    assert torch.allclose(row_rates(uniform, grid), torch.full((8,), n / 512), atol=0.03)
    again = make_mask(500, grid, n, generator=torch.Generator().manual_seed(21), masking="uniform")
    assert torch.equal(uniform, again)


@pytest.mark.parametrize(("grid", "n_masked"), CASES)
def test_original_masking_gives_every_clip_exactly_n_masked_distinct_patches(grid, n_masked):
    num_patches = grid[0] * grid[1]
    generator = torch.Generator().manual_seed(22)
    mask = make_mask(64, grid, n_masked, generator=generator, masking="original")
    assert mask.dtype == torch.bool
    assert mask.shape == (64, num_patches)
    assert mask.sum(dim=1).tolist() == [n_masked] * 64
    assert not bool(mask[:, 0].any())


def test_original_blocks_wrap_across_the_time_edge_into_the_next_row():
    # 2 x 2 blocks on a 4 x 4 grid, 3 masked: a block with all four cells on the grid ends
    # the loop by itself (4 > 3) and its three lowest cells are kept. The block starting
    # at the last time column of row 0 (index 3) covers 3, 4, 7, 8: index 4 is row 1's
    # first column, reached by wrapping, so the mask is {3, 4, 7}. Likewise {7, 8, 11}.
    generator = torch.Generator().manual_seed(23)
    mask = make_mask(400, (4, 4), 3, (2,), generator=generator, masking="original")
    patterns = {tuple(row.nonzero().flatten().tolist()) for row in mask}
    assert {(3, 4, 7), (7, 8, 11)} <= patterns
    # and the plain-Python loop agrees
    rng = random.Random(23)
    reference = {tuple(reference_original_mask(rng, (4, 4), 3, (2,))) for _ in range(400)}
    assert {(3, 4, 7), (7, 8, 11)} <= reference


def test_original_masking_matches_the_plain_python_loop_on_the_released_grid():
    grid, n, clips = (8, 64), 400, 2000
    rng = random.Random(24)
    reference = as_mask([reference_original_mask(rng, grid, n) for _ in range(clips)], 512)
    generator = torch.Generator().manual_seed(24)
    vectorised = make_mask(clips, grid, n, generator=generator, masking="original")
    assert reference.sum(dim=1).tolist() == [n] * clips
    assert torch.allclose(row_rates(vectorised, grid), row_rates(reference, grid), atol=0.03)
    # same block structure: the mean number of masked neighbours of a masked patch
    assert (
        abs(
            float(masked_neighbours(vectorised, grid).mean())
            - float(masked_neighbours(reference, grid).mean())
        )
        < 0.05
    )


def chi_square(a: Counter, b: Counter) -> float:
    """Two-sample chi-square statistic of two counts over the same categories."""
    na, nb = sum(a.values()), sum(b.values())
    total = 0.0
    for key in a.keys() | b.keys():
        pooled = (a[key] + b[key]) / (na + nb)
        total += (a[key] / na - b[key] / nb) ** 2 / (pooled * (1 / na + 1 / nb))
    return total


def test_original_masking_draws_each_mask_as_often_as_the_plain_python_loop():
    # On a 3 x 4 grid every possible mask is seen many times, so the whole distribution
    # can be compared, not just its row averages.
    grid, n, sizes, clips = (3, 4), 5, (2, 3), 20000
    rng = random.Random(25)
    reference = Counter(
        tuple(sorted(reference_original_mask(rng, grid, n, sizes))) for _ in range(clips)
    )
    generator = torch.Generator().manual_seed(25)

    def draw(masking: str) -> Counter:
        mask = make_mask(clips, grid, n, sizes, generator=generator, masking=masking)
        return Counter(tuple(row.nonzero().flatten().tolist()) for row in mask)

    original = draw("original")
    assert set(original) == set(reference)  # 33 possible masks, no others
    # 32 degrees of freedom: 80 is far in the tail for equal distributions (p < 1e-5)
    assert chi_square(original, reference) < 80
    assert chi_square(draw("uniform"), reference) > 1000


def test_the_originals_truncation_keeps_the_lowest_indices_at_the_released_counts():
    # `list(set)[:n]` keeps ascending order when CPython's set table outgrows the index
    # range (more than about 76 of 512 patches); the released 250/300/400 all qualify.
    rng = random.Random(26)
    for n in (250, 300, 400):
        for _ in range(20):
            kept = reference_original_mask(rng, (8, 64), n)
            assert kept == sorted(kept)


def test_original_masking_is_repeatable_from_a_seed():
    def draw(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return make_mask(16, (8, 64), 300, generator=generator, masking="original")

    assert torch.equal(draw(27), draw(27))
    assert not torch.equal(draw(27), draw(28))


def test_frame_models_get_random_masks_in_both_kinds():
    n = 100
    expected = random_mask(8, 512, n, generator=torch.Generator().manual_seed(29))
    for masking in ("original", "uniform"):
        generator = torch.Generator().manual_seed(29)
        mask = make_mask(8, (1, 512), n, generator=generator, masking=masking)
        assert torch.equal(mask, expected)


def test_original_masking_rejects_counts_its_loop_could_never_reach():
    # patch 0 is never masked and the loop needs n_masked + 1 covered patches
    with pytest.raises(ValueError, match=r"n_masked=31 .*masking='original'.*at most 30"):
        make_mask(2, (8, 4), 31, masking="original")
    assert make_mask(2, (8, 4), 30, masking="original").sum().item() == 60


def test_unknown_masking_kind_is_named():
    with pytest.raises(ValueError, match="masking='gaussian'"):
        make_mask(2, (8, 4), 5, masking="gaussian")


# ---- seeding: micro-batches, ranks and clips ----------------------------------------------


def test_mask_generator_is_stable_across_processes_and_distinguishes_its_parts():
    seed = mask_generator(0, "val", "clip-1").initial_seed()
    # A fixed number: BLAKE2b of the parts, not Python's per-process string hash.
    assert seed == MASK_GENERATOR_GOLDEN
    assert mask_generator(0, "val", "clip-1").initial_seed() == seed
    keys = [
        (0, "train", 0, 5, 0),
        (0, "train", 0, 5, 1),  # the next micro-batch of the same optimizer step
        (0, "train", 1, 5, 0),  # another rank
        (0, "train", 0, 6, 0),
        (1, "train", 0, 5, 0),
        (0, "val", "1"),
        (0, "val", 1),  # an int and its string are different parts
        (0, "val1"),
    ]
    seeds = {mask_generator(*key).initial_seed() for key in keys}
    assert len(seeds) == len(keys)
    assert all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError, match="ints or strings"):
        mask_generator(0, 1.5)


def test_one_generator_per_clip_gives_a_clip_the_same_mask_in_any_batch():
    ids = ["a", "b", "c", "d"]

    def masks(clips: list[str], masking: str) -> dict[str, torch.Tensor]:
        generators = [mask_generator(0, "val", clip) for clip in clips]
        mask = make_mask(len(clips), (8, 64), 400, generator=generators, masking=masking)
        assert mask.sum(dim=1).tolist() == [400] * len(clips)
        return dict(zip(clips, mask, strict=True))

    for masking in ("original", "uniform"):
        whole = masks(ids, masking)
        split = {**masks(["d", "b"], masking), **masks(["c", "a"], masking)}  # other ranks
        assert all(torch.equal(whole[c], split[c]) for c in ids)
        assert not torch.equal(whole["a"], whole["b"])
    # a per-clip generator advances: the second draw of a pass differs from the first
    generators = [mask_generator(0, "val", "a")]
    first = make_mask(1, (8, 64), 400, generator=generators)
    second = make_mask(1, (8, 64), 400, generator=generators)
    assert not torch.equal(first, second)
    with pytest.raises(ValueError, match="3 generators for a batch of 2"):
        make_mask(2, (8, 64), 400, generator=[torch.Generator()] * 3)
