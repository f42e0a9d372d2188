"""The s3prl upstream computes what SSAMBA's SUPERB upstream computed, on real audio.

s3prl's own arithmetic is written out here (not imported: s3prl is not a dependency):
`Featurizer.tolist` keeps the first round(len(wav) / downsample_rate) steps of each clip
and asserts the output is within 5 steps of round(longest / rate); MeanPooling averages
the kept steps.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _encoder_files import INPUT_FRAMES, write_small_encoder

from ssamba.audio import load_audio
from ssamba.features import FbankConfig
from ssamba.models import load_encoder_file
from ssamba.s3prl import UpstreamExpert

FREQ_PATCHES, WIDTH, STEP_SAMPLES = 8, 32, 16 * 160
WINDOW_SAMPLES = INPUT_FRAMES * 160  # the encoder's input: 2.56 s
# Kaldi's log-mel floor (log of float32 epsilon): what zero-padded waveform becomes.
LOG_MEL_FLOOR = math.log(torch.finfo(torch.float32).eps)
TOLERABLE_SEQLEN_DIFF = 5  # s3prl/upstream/interfaces.py


def kept_by_s3prl(wav: torch.Tensor, rate: int) -> int:
    """Steps s3prl's Featurizer keeps for one clip (Python's round, as s3prl)."""
    return round(len(wav) / rate)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_encoder(tmp_path_factory.mktemp("enc") / "encoder.pt", family="ssast")


@pytest.fixture(scope="module")
def wavs(fsdd_dir: Path, sample_wav: Path) -> list[torch.Tensor]:
    """Two spoken digits and 4 s of conversation: unequal lengths, the longest over one window."""
    digits = [load_audio(fsdd_dir / "recordings" / f"{d}_theo_1.wav")[0] for d in (4, 9)]
    return [*digits, load_audio(sample_wav)[0][: 16000 * 4]]


def test_only_the_last_layer_is_exposed_with_frequency_patches_side_by_side(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file))
    with torch.no_grad():
        out = upstream(wavs)

    hidden = out["hidden_states"]
    rate = upstream.get_downsample_rates("hidden_states")
    longest = max(len(w) for w in wavs)
    assert rate == STEP_SAMPLES  # one step per 16-frame time patch
    assert len(hidden) == 1  # SSAMBA's upstream: the last layer only
    assert hidden[0].shape == (3, math.ceil(longest / rate), FREQ_PATCHES * WIDTH)
    assert hidden[0].dtype == torch.float32
    torch.testing.assert_close(out["last_hidden_state"], hidden[0])


def test_steps_s3prl_keeps_cover_each_clip_to_within_half_a_step(
    encoder_file: Path, wavs: list[torch.Tensor], sample_wav: Path
) -> None:
    upstream = UpstreamExpert(str(encoder_file))
    rate = upstream.get_downsample_rates("hidden_states")
    recording = load_audio(sample_wav)[0]  # 30 s: 12 windows
    for batch in (wavs, [recording, wavs[0]]):
        with torch.no_grad():
            steps = upstream(batch)["last_hidden_state"].shape[1]
        longest = max(len(w) for w in batch)
        assert abs(steps - kept_by_s3prl(max(batch, key=len), rate)) < TOLERABLE_SEQLEN_DIFF
        for wav in batch:
            kept = kept_by_s3prl(wav, rate)
            # step k covers samples [k * rate, (k + 1) * rate): the kept steps end within
            # half a step of the clip's end, so none is mostly padding and no audio is lost
            assert 0 < kept <= steps
            assert abs(kept * rate - len(wav)) <= rate / 2
        assert steps == math.ceil(longest / rate)  # windows tile the steps without gaps


def test_padding_is_a_zero_padded_waveform_then_zero_frames_after_normalisation(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file))
    inputs: list[torch.Tensor] = []
    hook = upstream.encoder.patch_embed.register_forward_pre_hook(
        lambda module, args: inputs.append(args[0][:, 0].transpose(1, 2))  # (B, frames, bins)
    )
    short = wavs[0]
    padded = torch.nn.functional.pad(short, (0, 2 * WINDOW_SAMPLES - len(short)))
    with torch.no_grad():
        batched = upstream([short, wavs[2]])["last_hidden_state"]  # 4 s: two windows
        alone = upstream([padded])["last_hidden_state"]
    hook.remove()

    # the short clip's padded steps are those of its waveform zero-padded to whole windows
    torch.testing.assert_close(batched[0], alone[0, : batched.shape[1]])
    first_window = inputs[0][0]  # (INPUT_FRAMES, bins) of the short clip
    kaldi_frames = 1 + (WINDOW_SAMPLES - 400) // 160  # 254: 25 ms frames every 10 ms
    silent = torch.arange(INPUT_FRAMES) * 160 >= len(short)  # frames past the audio
    silent[kaldi_frames:] = False
    stats = FbankConfig()  # the test file carries the pretraining statistics
    floor = (LOG_MEL_FLOOR - stats.mean) / (2 * stats.std)
    assert floor == pytest.approx(-1.2776, abs=1e-4)
    torch.testing.assert_close(first_window[silent], torch.full_like(first_window[silent], floor))
    assert (first_window[kaldi_frames:] == 0).all()  # leftover frames: zero after normalisation


def test_the_final_norm_is_applied_once(tmp_path: Path, wavs: list[torch.Tensor]) -> None:
    bundle = load_encoder_file(write_small_encoder(tmp_path / "ssamba.pt", family="ssamba"))
    assert bundle.encoder.cfg.double_final_norm  # our SSAMBA encoder normalises twice
    with torch.no_grad():  # a norm that is not idempotent, so once and twice differ
        bundle.encoder.norm_f.weight.uniform_(0.5, 2.0)
        bundle.encoder.norm_f.bias.normal_()
    path = bundle.save(tmp_path / "trained_norm.pt")
    upstream = UpstreamExpert(str(path))
    norm_inputs: list[torch.Tensor] = []
    upstream.encoder.norm_f.register_forward_hook(
        lambda module, args, out: norm_inputs.append(args[0])
    )
    with torch.no_grad():
        hidden = upstream(wavs[:1])["last_hidden_state"]
        calls = len(norm_inputs)
        norm = upstream.encoder.norm_f
        once, twice = norm(norm_inputs[0]), norm(norm(norm_inputs[0]))

    def layout(tokens: torch.Tensor) -> torch.Tensor:  # cls first, frequency-major patches
        grid = tokens[:, 1:].unflatten(1, (FREQ_PATCHES, -1))
        return grid.permute(0, 2, 1, 3).flatten(2)[:, : hidden.shape[1]]

    assert calls == 1
    torch.testing.assert_close(hidden, layout(once))
    assert not torch.allclose(hidden, layout(twice), atol=1e-3)


def test_ssamba_geometry_10s_windows_at_stride_10_passes_s3prls_length_check(
    encoder_file: Path, sample_wav: Path
) -> None:
    upstream = UpstreamExpert(str(encoder_file), window_seconds=10, stride=10)
    recording = load_audio(sample_wav)[0]  # 30 s: three 10 s windows of 99 steps
    with torch.no_grad():
        hidden = upstream([recording])["last_hidden_state"]

    rate = upstream.get_downsample_rates("hidden_states")
    assert rate == 10 * 160
    assert upstream.encoder.grid == (12, 99)  # SSAMBA's (B, T', 12 * D)
    assert hidden.shape == (1, 3 * 99, 12 * WIDTH)
    assert abs(hidden.shape[1] - kept_by_s3prl(recording, rate)) < TOLERABLE_SEQLEN_DIFF


def test_gradients_reach_the_encoder_for_upstream_fine_tuning(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file)).train()
    out = upstream(wavs[:2])

    out["last_hidden_state"].pow(2).mean().backward()

    assert out["last_hidden_state"].shape[-1] == FREQ_PATCHES * WIDTH
    assert upstream.encoder.patch_embed.proj.weight.grad.abs().sum() > 0


def test_an_empty_batch_or_a_nan_sample_is_refused_naming_it(
    encoder_file: Path, wavs: list[torch.Tensor]
) -> None:
    upstream = UpstreamExpert(str(encoder_file))
    broken = wavs[1].clone()
    broken[100] = float("nan")

    with pytest.raises(ValueError, match="empty list"):
        upstream([])
    with pytest.raises(ValueError, match="clip 1 has NaN or infinite samples"):
        upstream([wavs[0], broken])
