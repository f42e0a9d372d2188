"""X-ARES's encoder contract for `ssamba.xares.SsambaEncoder`: xares' own
`check_audio_encoder` (`make install` puts the xares package in without its dependencies,
which the checker does not import), the properties it checks, and ten minutes of audio in
one call."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _encoder_files import write_small_encoder
from xares.audio_encoder_checker import check_audio_encoder

from ssamba.audio import load_audio
from ssamba.xares import SsambaEncoder

WIDTH = 32


@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> SsambaEncoder:
    return SsambaEncoder(write_small_encoder(tmp_path_factory.mktemp("x") / "encoder.pt"))


def test_the_encoder_meets_the_xares_contract(encoder: SsambaEncoder) -> None:
    assert check_audio_encoder(encoder) is True
    # what the checker looks at, with the values this encoder must have
    assert type(encoder).__name__.endswith("Encoder")
    assert isinstance(encoder, torch.nn.Module)
    assert encoder.output_dim == WIDTH
    assert encoder.sampling_rate == 16000
    assert encoder.hop_size_in_ms == 160.0  # 16-frame time patches of 10 ms frames
    sample_audio = torch.randn(2, 50000)
    encoded = encoder(sample_audio)
    assert isinstance(encoded, torch.Tensor) and encoded.ndim == 3
    assert encoded.size(0) == sample_audio.size(0) and encoded.size(2) == encoder.output_dim
    assert encoded.size(1) == 19  # patch centres 87.5 + 160 k ms before 3125 ms


@pytest.mark.parametrize("seconds", [0.1, 1.0, 7.3])
def test_frames_follow_the_hop_for_any_length(encoder: SsambaEncoder, seconds: float) -> None:
    audio = torch.randn(3, int(16000 * seconds)) * 0.1

    encoded = encoder(audio)

    centres = 87.5 + encoder.hop_size_in_ms * torch.arange(10_000)
    expected = max(1, int((centres < 1000 * seconds).sum()))
    assert encoded.shape == (3, expected, WIDTH) and torch.isfinite(encoded).all()


def test_ten_minutes_encode_in_one_call_a_batch_of_windows_at_a_time(
    encoder: SsambaEncoder, sample_wav: Path
) -> None:
    wave, _ = load_audio(sample_wav)
    audio = wave.repeat(20)[None]  # the 30 s recording, 20 times: 10 minutes
    batches: list[int] = []
    hook = encoder.embedder.encoder.patch_embed.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    try:
        encoded = encoder(audio)
    finally:
        hook.remove()

    assert encoded.shape == (1, 3750, WIDTH)  # 600 s / 160 ms
    # memory: every pass holds at most batch_size windows, whatever the length
    assert max(batches) <= encoder.embedder.batch_size and sum(batches) == 235
    first_window = encoder(wave[None])[:, :16]
    torch.testing.assert_close(encoded[:, :16], first_window)
