"""AudioEncoder: geometry, masking, pairing and final norms, pooling, resizing, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ssamba.audio import load_audio
from ssamba.features import FbankConfig, clip_features
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.transformer import Attention

REPO = Path(__file__).resolve().parents[1]


def small(family: str, **overrides) -> AudioEncoder:
    """A 2-layer, 32-wide encoder of `family` (eval mode, fixed seed)."""
    torch.manual_seed(0)
    cfg = EncoderConfig.preset(
        family,
        "tiny",
        **{"embed_dim": 32, "depth": 2, "num_heads": 2, "input_frames": 128, **overrides},
    )
    return AudioEncoder(cfg).eval()


def fbank(frames: int = 128, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, frames, 128, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    ("family", "size", "millions"),
    [("ssamba", "tiny", 6.9), ("ssamba", "small", 25.4), ("ssamba", "base", 96.7)],
)
def test_parameter_counts_match_the_published_ssamba_sizes(family, size, millions):
    with torch.device("meta"):
        encoder = AudioEncoder(EncoderConfig.preset(family, size))
    count = sum(p.numel() for p in encoder.parameters()) / 1e6
    assert abs(count - millions) / millions < 0.02, f"{family}-{size}: {count:.2f}M"


@pytest.mark.parametrize("frames", [128, 512, 1024])
@pytest.mark.parametrize(
    ("patch", "stride", "grid_of"),
    [
        ((16, 16), (16, 16), lambda t: (8, t // 16)),
        ((16, 16), (10, 10), lambda t: (12, (t - 16) // 10 + 1)),
        ((128, 2), (128, 2), lambda t: (1, t // 2)),
    ],
)
def test_token_shapes_for_patch_and_frame_geometries(frames, patch, stride, grid_of):
    encoder = small("ssamba", input_frames=frames, patch=patch, stride=stride)
    grid = grid_of(frames)
    x = fbank(frames, batch=1)
    with torch.no_grad():
        tokens = encoder.forward_features(x)
    assert encoder.grid == grid
    assert tokens.shape == (1, 1 + grid[0] * grid[1], 32)
    assert encoder.patch_tokens(tokens).shape == (1, grid[0] * grid[1], 32)
    assert encoder.unfold_patches(x).shape == (1, grid[0] * grid[1], patch[0] * patch[1])


@pytest.mark.parametrize(("family", "prefix"), [("ssamba", 1), ("ssast", 2), ("aum", 1)])
def test_every_family_gives_tokens_pooled_embeddings_and_layers(family, prefix):
    encoder = small(family)
    x = fbank()
    with torch.no_grad():
        tokens = encoder.forward_features(x)
        layers = encoder.forward_features(x, return_layers=True)
        assert tokens.shape == (2, prefix + 64, 32)
        assert encoder(x).shape == encoder(x, pool="cls").shape == (2, 32)
    # One entry per block, per pair when layers are paired; the last is the final output.
    assert len(layers) == (1 if family == "ssamba" else 2)
    torch.testing.assert_close(layers[-1], tokens)


def test_unfolded_patches_are_the_input_values_in_token_order():
    encoder = small("ssamba")
    x = fbank(batch=1)
    patches = encoder.unfold_patches(x)
    f, t = 2, 5  # token index f * grid_t + t covers mel bins 32..47 and frames 80..95
    expected = x[0, 80:96, 32:48].T.reshape(-1)  # (freq, time) row-major, like the conv kernel
    torch.testing.assert_close(patches[0, f * encoder.grid[1] + t], expected)


def test_masked_patches_are_invisible_and_unmasked_ones_are_not():
    encoder = small("ssamba")
    x = fbank(batch=1)
    mask = torch.zeros(1, encoder.num_patches, dtype=torch.bool)
    mask[0, 10] = True  # token 10 = frequency row 1, time column 2: frames 32..47, bins 16..31
    changed_masked, changed_visible = x.clone(), x.clone()
    changed_masked[0, 32:48, 16:32] += 5.0
    changed_visible[0, 64:80, 16:32] += 5.0  # token 12, not masked
    with torch.no_grad():
        plain = encoder.forward_features(x)
        masked = encoder.forward_features(x, mask=mask)
        torch.testing.assert_close(encoder.forward_features(changed_masked, mask=mask), masked)
        visible_effect = encoder.forward_features(changed_visible, mask=mask) - masked
    assert (masked[0, 1 + 10] - plain[0, 1 + 10]).abs().max() > 1e-3
    assert visible_effect.abs().max() > 1e-3


def test_mask_embedding_receives_gradient_only_when_something_is_masked():
    encoder = small("ssamba").train()
    mask = torch.zeros(2, encoder.num_patches, dtype=torch.bool)
    encoder.forward_features(fbank(), mask=mask).sum().backward()
    assert encoder.mask_embed.grad is None or encoder.mask_embed.grad.abs().sum() == 0
    mask[:, :5] = True
    encoder.forward_features(fbank(), mask=mask).square().sum().backward()
    assert encoder.mask_embed.grad.abs().sum() > 0


def test_first_pair_doubles_the_residual_and_norm_f_runs_twice_as_in_ssamba():
    encoder = small("ssamba")
    x = fbank(batch=1)
    with torch.no_grad():
        patches = encoder.patch_embed(x.transpose(1, 2).unsqueeze(1))
        tokens = torch.cat([encoder.cls_token, patches], dim=1) + encoder.pos_embed
        first, second = encoder.layers
        h = first.mixer(first.norm(tokens)) + second.mixer(second.norm(tokens.flip(1))).flip(1)
        residual = 2 * tokens  # both layers of the pair start their residual from the input
        expected = encoder.norm_f(encoder.norm_f(residual + h))
        torch.testing.assert_close(encoder.forward_features(x), expected)
        single = AudioEncoder(
            EncoderConfig(**{**encoder.cfg.to_dict(), "double_final_norm": False})
        )
        single.load_state_dict(encoder.state_dict())
        torch.testing.assert_close(single.eval().forward_features(x), encoder.norm_f(residual + h))


def test_aum_cls_token_sits_in_the_middle_of_the_sequence():
    # In a causal (Fo-Fo) stack, only tokens at or after the cls position can see the cls token.
    encoder = small("aum", bimamba="none")
    x = fbank(batch=1)
    middle = encoder.num_patches // 2
    assert encoder.prefix_start == middle
    with torch.no_grad():
        before = encoder.forward_features(x)
        encoder.cls_token.add_(1.0)
        change = (encoder.forward_features(x) - before).abs().amax(dim=(0, 2))
    assert change[:middle].max() == 0
    assert change[middle:].min() > 0
    assert torch.equal(encoder.pool(before, "cls"), before[:, middle])
    kept = encoder.patch_tokens(before)
    assert torch.equal(kept, torch.cat([before[:, :middle], before[:, middle + 1 :]], dim=1))


def test_ssast_cls_pooling_averages_cls_and_dist_tokens():
    encoder = small("ssast")
    tokens = torch.randn(2, 2 + encoder.num_patches, 32)
    torch.testing.assert_close(encoder.pool(tokens, "cls"), (tokens[:, 0] + tokens[:, 1]) / 2)
    torch.testing.assert_close(encoder.pool(tokens, "mean"), tokens[:, 2:].mean(dim=1))


def test_clip_patches_are_the_columns_holding_frames_and_mean_pooling_can_keep_only_them():
    encoder = small("ssamba", input_frames=64)  # 16 x 16 patches: 8 x 4 grid
    frames = torch.tensor([64, 40, 16, 17, 0])
    assert encoder.clip_columns(frames).tolist() == [4, 3, 1, 2, 1]
    own = encoder.clip_patches(frames).view(5, 8, 4)
    assert own[1, :, :3].all() and not own[1, :, 3:].any()
    assert (own[1] == own[1, 0]).all()  # every frequency row alike
    tokens = torch.randn(5, 1 + 32, 32)
    pooled = encoder.pool(tokens, "mean", own.view(5, -1))
    patches = encoder.patch_tokens(tokens).view(5, 8, 4, 32)
    torch.testing.assert_close(pooled[1], patches[1, :, :3].mean(dim=(0, 1)))
    torch.testing.assert_close(pooled[0], encoder.pool(tokens, "mean")[0])


def test_statistics_pooling_is_mean_and_deviation_and_ignores_what_padding_holds():
    encoder = small("ssamba", input_frames=64)  # 8 x 4 grid, width 32
    tokens = torch.randn(3, 1 + 32, 32)
    patches = encoder.patch_tokens(tokens)
    pooled = encoder.pool(tokens, "stats")
    assert pooled.shape == (3, 64) == (3, encoder.pooled_dim("stats"))
    torch.testing.assert_close(pooled[:, :32], patches.mean(dim=1))
    torch.testing.assert_close(pooled[:, 32:], patches.std(dim=1, unbiased=False))
    # with the clip's own patches kept, whatever the padding columns hold changes nothing
    own = encoder.clip_patches(torch.tensor([64, 40, 16]))
    kept = encoder.pool(tokens, "stats", own)
    noisy = tokens.clone()
    noisy[:, 1:][~own] = 100 * torch.randn(int((~own).sum()), 32)
    torch.testing.assert_close(encoder.pool(noisy, "stats", own), kept)
    assert not torch.allclose(encoder.pool(noisy, "stats"), pooled)
    mine = patches[1].view(8, 4, 32)[:, :3].reshape(-1, 32)
    torch.testing.assert_close(kept[1], torch.cat([mine.mean(0), mine.std(0, unbiased=False)]))
    # one patch: zero spread, finite gradient
    one = torch.randn(1, 1 + 32, 32, requires_grad=True)
    single = torch.zeros(1, 32, dtype=torch.bool)
    single[0, 0] = True
    encoder.pool(one, "stats", single).sum().backward()
    assert torch.isfinite(one.grad).all()


def test_band_statistics_pool_each_frequency_band_over_time_and_ignore_padding():
    encoder = small("ssamba", input_frames=64)  # 8 bands x 4 time steps, width 32
    tokens = torch.randn(3, 1 + 32, 32)
    bands = encoder.patch_tokens(tokens).view(3, 8, 4, 32)  # frequency-major

    pooled = encoder.pool(tokens, "band-stats")

    assert pooled.shape == (3, 8 * 64) == (3, encoder.pooled_dim("band-stats"))
    per_band = pooled.view(3, 8, 64)
    torch.testing.assert_close(per_band[:, :, :32], bands.mean(dim=2))
    torch.testing.assert_close(per_band[:, :, 32:], bands.std(dim=2, unbiased=False))
    # swapping two bands swaps their blocks: which band holds what is kept
    swapped = torch.cat([tokens[:, :1], bands[:, [1, 0, *range(2, 8)]].flatten(1, 2)], dim=1)
    moved = encoder.pool(swapped, "band-stats").view(3, 8, 64)
    torch.testing.assert_close(moved[:, [1, 0]], per_band[:, :2])
    # with the clip's own columns kept, padding columns change nothing
    own = encoder.clip_patches(torch.tensor([64, 40, 16]))
    kept = encoder.pool(tokens, "band-stats", own)
    noisy = tokens.clone()
    noisy[:, 1:][~own] = 100 * torch.randn(int((~own).sum()), 32)
    torch.testing.assert_close(encoder.pool(noisy, "band-stats", own), kept)
    mine = bands[1, :, :3]  # clip 1 holds 3 of the 4 columns
    expected = torch.cat([mine.mean(1), mine.std(1, unbiased=False)], dim=-1).flatten()
    torch.testing.assert_close(kept[1], expected)


def test_resize_to_shorter_input_crops_position_grid_around_the_centre():
    encoder = small("ssamba", input_frames=1024)
    old = encoder.pos_embed.detach().clone()
    conv = encoder.patch_embed.proj.weight.detach().clone()
    encoder.resize_input(input_frames=512)
    assert encoder.grid == (8, 32) and encoder.pos_embed.shape == (1, 1 + 256, 32)
    old_grid = old[:, 1:].reshape(8, 64, 32)
    torch.testing.assert_close(encoder.pos_embed[:, 1:].reshape(8, 32, 32), old_grid[:, 16:48])
    torch.testing.assert_close(encoder.pos_embed[:, :1], old[:, :1])
    assert torch.equal(encoder.patch_embed.proj.weight, conv)
    assert encoder.forward_features(fbank(512, batch=1)).shape == (1, 257, 32)


def test_resize_to_overlapping_stride_interpolates_the_position_grid():
    encoder = small("ssamba", input_frames=1024)
    encoder.resize_input(stride=10)
    assert encoder.cfg.stride == (10, 10) and encoder.grid == (12, 101)
    assert encoder.pos_embed.shape == (1, 1 + 12 * 101, 32)
    assert encoder.patch_embed.proj.stride == (10, 10)
    with torch.no_grad():
        assert encoder.forward_features(fbank(1024, batch=1)).shape == (1, 1 + 1212, 32)


def test_resize_to_the_same_grid_is_the_identity():
    encoder = small("ssamba")
    before = encoder.pos_embed
    encoder.resize_input(input_frames=130)  # (130 - 16) // 16 + 1 = 8 columns, as for 128
    assert encoder.pos_embed is before


def test_wrong_input_shapes_and_bad_config_get_named():
    encoder = small("ssamba")
    with pytest.raises(ValueError, match="frames=128"):
        encoder.forward_features(fbank(100))
    with pytest.raises(ValueError, match="mask: expected bool"):
        encoder.forward_features(fbank(), mask=torch.zeros(2, encoder.num_patches))
    with pytest.raises(ValueError, match="unknown keys \\['depht'\\]"):
        EncoderConfig.preset("ssamba", "tiny", depht=12)
    with pytest.raises(ValueError, match="size"):
        EncoderConfig.preset("ssamba", "huge")
    with pytest.raises(ValueError, match="even depth"):
        EncoderConfig(depth=3)
    with pytest.raises(ValueError, match=r"EncoderConfig\.patch"):
        EncoderConfig(input_frames=8)


def test_presets_are_faithful_to_the_published_models():
    ssamba = EncoderConfig.preset("ssamba", "base")
    assert (ssamba.embed_dim, ssamba.depth, ssamba.norm, ssamba.norm_eps) == (
        768,
        24,
        "layer",
        1e-5,
    )
    assert ssamba.bimamba == "v2" and ssamba.divide_out and ssamba.bidirectional_pairs
    assert ssamba.double_final_norm and ssamba.drop_path_rate == 0.1
    ssast = EncoderConfig.preset("ssast", "small")
    assert (ssast.embed_dim, ssast.num_heads, ssast.depth, ssast.prefix_tokens) == (384, 6, 12, 2)
    aum = EncoderConfig.preset("aum", "tiny")
    assert (aum.norm, aum.cls_position, aum.bidirectional_pairs) == ("rms", "middle", False)
    assert not EncoderConfig.preset("aum", "tiny", bimamba="v1").divide_out
    with torch.device("meta"):
        encoder = AudioEncoder(ssamba)
    rates = [layer.drop_path.p for layer in encoder.layers]
    assert rates[0] == rates[1] == 0.0 and rates[-1] == pytest.approx(0.1 * 22 / 23)
    assert encoder.drop_path.p == 0.1


def test_naive_and_sdpa_attention_agree():
    torch.manual_seed(0)
    sdpa = Attention(32, num_heads=4, impl="sdpa")
    naive = Attention(32, num_heads=4, impl="naive")
    naive.load_state_dict(sdpa.state_dict())
    x = torch.randn(2, 50, 32)
    torch.testing.assert_close(naive(x), sdpa(x), atol=1e-5, rtol=1e-4)


def test_ssamba_tiny_trains_on_ten_seconds_of_real_audio(sample_wav):
    wave, sr = load_audio(sample_wav)
    x = clip_features(wave[: 16000 * 11], sr, FbankConfig(target_length=1024), train=False)[None]
    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig.preset("ssamba", "tiny", input_frames=1024)).train()
    embedding = encoder(x)
    embedding.square().mean().backward()
    assert embedding.shape == (1, 192) and torch.isfinite(embedding).all()
    unused = {"mask_embed"}  # only masked pretraining inputs use it
    for name, p in encoder.named_parameters():
        assert name in unused or (p.grad is not None and torch.isfinite(p.grad).all()), name
    assert encoder.layers[-1].mixer.conv1d_b.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("piece", sorted((REPO / "recipes" / "model").glob("*_*.yaml")), ids=str)
def test_recipe_model_pieces_are_the_published_configurations(piece: Path) -> None:
    """A piece names only what differs from its family's defaults; built, it equals the
    published preset (or, for the CPU demo piece, tiny's design at another size)."""
    fields = yaml.safe_load(piece.read_text())
    family, size = piece.stem.split("_", 1)
    built = EncoderConfig(**fields)
    if size in ("tiny", "small", "base"):
        assert built == EncoderConfig.preset(family, size)
    else:
        assert built == EncoderConfig.preset(
            family, "tiny", embed_dim=built.embed_dim, depth=built.depth
        )


def test_fields_left_unset_take_the_family_defaults() -> None:
    ssast = EncoderConfig(family="ssast", embed_dim=384)
    assert (ssast.depth, ssast.num_heads, ssast.prefix_tokens, ssast.norm_eps) == (12, 6, 2, 1e-6)
    aum = EncoderConfig(family="aum")
    assert (aum.norm, aum.cls_position, aum.bidirectional_pairs) == ("rms", "middle", False)
    assert (aum.bimamba, aum.divide_out) == ("v1", False)  # AuM's "Fo-Bi" default
    assert EncoderConfig(family="ssamba", stride=None).stride == (16, 16)
    assert EncoderConfig.from_dict(ssast.to_dict()) == ssast  # saved configs are concrete
