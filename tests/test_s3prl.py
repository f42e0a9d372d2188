"""The s3prl upstream: every layer, equal shapes for a padded batch of unequal lengths."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _encoder_files import write_small_encoder

from ssamba.audio import load_audio
from ssamba.s3prl import UpstreamExpert


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_encoder(tmp_path_factory.mktemp("enc") / "encoder.pt", family="ssast")


@pytest.fixture(scope="module")
def wavs(fsdd_dir: Path, sample_wav: Path) -> list[torch.Tensor]:
    """Two spoken digits and 4 s of conversation: unequal lengths, the longest over one window."""
    digits = [load_audio(fsdd_dir / "recordings" / f"{d}_theo_1.wav")[0] for d in (4, 9)]
    return [*digits, load_audio(sample_wav)[0][: 16000 * 4]]


def test_hidden_states_of_every_layer_have_one_shape_for_unequal_lengths(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file))
    with torch.no_grad():
        out = upstream(wavs)

    hidden = out["hidden_states"]
    rate = upstream.get_downsample_rates("hidden_states")
    longest = max(len(w) for w in wavs)
    assert len(hidden) == 2  # ssast: one per block
    assert {tuple(h.shape) for h in hidden} == {(3, longest // rate, 8 * 32)}
    assert rate == 16 * 160
    torch.testing.assert_close(out["last_hidden_state"], hidden[-1])
    assert not torch.allclose(hidden[0], hidden[1])


def test_gradients_reach_the_encoder_for_upstream_fine_tuning(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file), freq="mean")
    out = upstream(wavs[:2])

    out["last_hidden_state"].pow(2).mean().backward()

    assert out["last_hidden_state"].shape[-1] == 32
    assert upstream.embedder.encoder.patch_embed.proj.weight.grad.abs().sum() > 0
