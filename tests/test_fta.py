"""Factorized time/frequency attention (FTA) of the transformer family."""

from __future__ import annotations

import pytest
import torch

from ssamba.bench.fta import attention_gflop
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.transformer import Attention, factorized_attention


def tiny_ssast(attention: str, frames: int = 64) -> AudioEncoder:
    torch.manual_seed(0)
    cfg = EncoderConfig(
        family="ssast", embed_dim=32, depth=2, num_heads=2, input_frames=frames, attention=attention
    )
    return AudioEncoder(cfg).eval()


def test_fta_encoder_gives_every_output_shape_and_loads_full_attention_weights():
    full, fta = tiny_ssast("sdpa"), tiny_ssast("fta")
    fta.load_state_dict(full.state_dict())  # same parameters, same names
    x = torch.randn(2, 64, 128)
    tokens = fta.forward_features(x)
    assert tokens.shape == (2, 2 + fta.num_patches, 32)
    assert fta(x).shape == (2, 32)
    assert len(fta.forward_features(x, return_layers=True)) == 2
    masked = torch.zeros(2, fta.num_patches, dtype=torch.bool)
    masked[:, :5] = True
    assert fta.forward_features(x, mask=masked).shape == tokens.shape  # pretraining input
    assert not torch.allclose(fta(x), full(x))  # a different attention pattern


def test_a_patch_sees_only_its_row_its_column_and_the_prefix():
    grid, prefix = (4, 5), 2
    q, k, v = (torch.randn(1, 1, prefix + 20, 8, requires_grad=True) for _ in range(3))
    out = factorized_attention(q, k, v, grid, prefix, start=0)
    assert out.shape == q.shape
    f, t = 1, 2  # the patch at row 1, column 2
    out[0, 0, prefix + f * 5 + t].sum().backward()
    reached = v.grad[0, 0].abs().sum(-1) > 0
    expected = torch.zeros(prefix + 20, dtype=torch.bool)
    expected[:prefix] = True
    for j in range(20):
        expected[prefix + j] = j // 5 == f or j % 5 == t
    assert torch.equal(reached, expected)


def test_prefix_tokens_attend_to_every_patch():
    q, k, v = (torch.randn(1, 1, 2 + 12, 8, requires_grad=True) for _ in range(3))
    out = factorized_attention(q, k, v, (3, 4), 2, start=0)
    out[0, 0, 0].sum().backward()
    assert bool((v.grad[0, 0].abs().sum(-1) > 0).all())


def test_fta_needs_the_grid():
    attention = Attention(32, 2, impl="fta")
    with pytest.raises(ValueError, match="needs the patch grid"):
        attention(torch.randn(1, 10, 32))


def test_fta_cost_grows_slower_than_full_attention_with_the_grid():
    """Counted FLOPs of the attention products (a busy machine cannot blur them): full
    attention costs (F T)^2, FTA F T (F + T). Quadrupling both axes multiplies the first
    by 256 and the second by about 64; with 8 rows (128 mel bins) FTA's share keeps falling
    as the clip grows."""
    small, large = (4, 8), (16, 32)
    growth = {
        impl: attention_gflop(impl, large) / attention_gflop(impl, small)
        for impl in ("sdpa", "fta")
    }
    assert growth["fta"] < 0.5 * growth["sdpa"], growth
    shares = [
        attention_gflop("fta", (8, t)) / attention_gflop("sdpa", (8, t)) for t in (16, 64, 256)
    ]
    assert shares[0] > shares[1] > shares[2], shares
