"""Features equal the originals' Kaldi fbank chain; augmentations do what SSAST's do."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import torchaudio

from ssamba.audio import load_audio
from ssamba.features import (
    DATASET_STATS,
    FbankConfig,
    clip_features,
    mix_targets,
    mix_waves,
    noise_and_roll,
    normalise,
    pad_or_crop,
    sample_mixup_lambda,
    spec_augment,
    wav_to_fbank,
)

RAW = FbankConfig(target_length=None)


@pytest.fixture(scope="module")
def ten_seconds(sample_wav: Path) -> torch.Tensor:
    wave, _ = load_audio(sample_wav)
    return wave[: 10 * 16000]


def _kaldi_reference(wave: torch.Tensor) -> torch.Tensor:
    """The call in SSAST/SSAMBA/AuM `_wav2fbank`, written out."""
    centred = (wave - wave.mean()).unsqueeze(0)
    return torchaudio.compliance.kaldi.fbank(
        centred,
        htk_compat=True,
        sample_frequency=16000,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=128,
        dither=0.0,
        frame_shift=10,
    )


def test_fbank_of_real_clip_equals_the_originals_kaldi_call(fsdd_dir: Path) -> None:
    wave, sr = load_audio(fsdd_dir / "recordings" / "7_theo_12.wav")
    fbank = wav_to_fbank(wave, sr, RAW)
    torch.testing.assert_close(fbank, _kaldi_reference(wave), rtol=0, atol=0)


def test_ten_seconds_give_998_frames_zero_padded_to_1024(ten_seconds: torch.Tensor) -> None:
    raw = wav_to_fbank(ten_seconds, 16000, RAW)
    padded = wav_to_fbank(ten_seconds, 16000, FbankConfig(target_length=1024))
    assert raw.shape == (998, 128) == (RAW.num_frames(ten_seconds.numel()), 128)
    assert padded.shape == (1024, 128)
    torch.testing.assert_close(padded[:998], raw)
    assert padded[998:].abs().max() == 0  # padding is zeros before normalisation


def test_crop_modes_keep_start_centre_or_a_random_window() -> None:
    fbank = torch.arange(100.0).unsqueeze(1).expand(100, 4)
    assert pad_or_crop(fbank, 40, "start")[0, 0] == 0
    assert pad_or_crop(fbank, 40, "center")[0, 0] == 30
    first = [
        pad_or_crop(fbank, 40, "random", torch.Generator().manual_seed(s))[0, 0] for s in range(20)
    ]
    assert all(0 <= f <= 60 for f in first) and len(set(first)) > 1
    again = pad_or_crop(fbank, 40, "random", torch.Generator().manual_seed(3))
    torch.testing.assert_close(
        again, pad_or_crop(fbank, 40, "random", torch.Generator().manual_seed(3))
    )
    short = pad_or_crop(fbank[:10], 40, "random")
    assert short.shape == (40, 4) and short[10:].abs().max() == 0


def test_normalise_is_mean_over_twice_std() -> None:
    x = torch.tensor([-4.0, 2.0, 6.0])
    torch.testing.assert_close(normalise(x, mean=2.0, std=2.0), torch.tensor([-1.5, 0.0, 1.0]))


def test_evaluation_features_are_deterministic_and_normalised(ten_seconds: torch.Tensor) -> None:
    mean, std = DATASET_STATS["esc50"]
    cfg = FbankConfig(
        mean=mean, std=std, target_length=512, freqm=24, timem=96, noise=True, crop="random"
    )
    a = clip_features(ten_seconds, 16000, cfg, train=False)
    b = clip_features(ten_seconds, 16000, cfg, train=False)
    torch.testing.assert_close(a, b)
    expected = normalise(
        wav_to_fbank(ten_seconds, 16000, cfg, crop="start"), *DATASET_STATS["esc50"]
    )
    torch.testing.assert_close(a, expected)


def test_training_features_are_augmented(ten_seconds: torch.Tensor) -> None:
    cfg = FbankConfig(target_length=1024, freqm=48, timem=192, noise=True)
    torch.manual_seed(0)
    a = clip_features(ten_seconds, 16000, cfg, train=True)
    b = clip_features(ten_seconds, 16000, cfg, train=True)
    assert a.shape == b.shape == (1024, 128)
    assert not torch.equal(a, b)


def test_spec_augment_zeroes_whole_mel_bands_and_frame_spans() -> None:
    torch.manual_seed(1)
    fbank = torch.rand(200, 128) + 1.0
    masked = spec_augment(fbank, freqm=60, timem=100)
    zero = masked == 0
    bands = zero.all(dim=0).sum().item()
    spans = zero.all(dim=1).sum().item()
    assert bands + spans > 0
    # every zeroed value lies in a fully zeroed band or span, nothing else changed
    covered = zero.all(dim=0).unsqueeze(0) | zero.all(dim=1).unsqueeze(1)
    assert torch.equal(zero, covered)
    assert torch.equal(masked[~zero], fbank[~zero])


def test_noise_is_small_and_roll_shifts_at_most_ten_frames() -> None:
    fbank = torch.arange(64.0).unsqueeze(1).repeat(1, 8)
    shifts = set()
    for seed in range(60):
        out = noise_and_roll(fbank, torch.Generator().manual_seed(seed))
        # roll by s puts row (-s mod 64), i.e. value (-s mod 64), first
        shift = -int(out[0, 0].floor().item()) % 64
        shift = shift - 64 if shift >= 32 else shift
        noise = out - torch.roll(fbank, shift, dims=0)
        assert (noise >= 0).all() and (noise <= 0.1).all()
        shifts.add(shift)
    assert shifts <= set(range(-10, 10)) and len(shifts) > 5


def test_mixup_mixes_dc_free_waves_and_targets() -> None:
    a = torch.ones(100) + torch.linspace(-1, 1, 100)
    b = torch.linspace(0, 1, 50)
    mixed = mix_waves(a, b, lam=0.7)
    assert mixed.shape == (100,)
    assert abs(mixed.mean().item()) < 1e-6
    torch.testing.assert_close(mix_waves(a, b, lam=1.0), a - a.mean())
    torch.testing.assert_close(
        mix_waves(b, a, lam=0.0), a[:50] - a.mean() - (a[:50] - a.mean()).mean()
    )
    target = mix_targets(torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0]), 0.7)
    torch.testing.assert_close(target, torch.tensor([0.7, 0.0, 0.3]))


def test_mixup_lambda_follows_beta_10_10() -> None:
    rng = random.Random(0)
    draws = torch.tensor([sample_mixup_lambda(rng=rng) for _ in range(4000)])
    assert abs(draws.mean().item() - 0.5) < 0.01
    assert abs(draws.std().item() - (0.25 / 21) ** 0.5) < 0.01  # Beta(10,10) std = 0.109


def test_mfcc_option_uses_the_same_frames(ten_seconds: torch.Tensor) -> None:
    cfg = FbankConfig(kind="mfcc", num_ceps=40, target_length=None)
    mfcc = wav_to_fbank(ten_seconds, 16000, cfg)
    assert mfcc.shape == (998, 40) and cfg.feature_dim == 40
    reference = torchaudio.compliance.kaldi.mfcc(
        (ten_seconds - ten_seconds.mean()).unsqueeze(0),
        num_ceps=40,
        num_mel_bins=128,
        htk_compat=True,
        use_energy=False,
        window_type="hanning",
        dither=0.0,
        frame_shift=10,
        sample_frequency=16000,
    )
    torch.testing.assert_close(mfcc, reference)


def test_published_normalisation_constants() -> None:
    assert DATASET_STATS["asli"] == (-4.2677393, 4.5689974)
    assert DATASET_STATS["esc50"] == (-6.6268077, 5.358466)
    assert DATASET_STATS["speechcommands"] == (-6.845978, 5.5654526)
    assert FbankConfig().mean == DATASET_STATS["asli"][0]


def test_bad_inputs_name_the_problem() -> None:
    with pytest.raises(ValueError, match=r"8000 Hz.*resample"):
        wav_to_fbank(torch.randn(8000), 8000, RAW)
    with pytest.raises(ValueError, match="shorter than one"):
        wav_to_fbank(torch.randn(100), 16000, RAW)
    with pytest.raises(ValueError, match="mono"):
        wav_to_fbank(torch.randn(2, 16000), 16000, RAW)
    with pytest.raises(ValueError, match=r"FbankConfig\.crop"):
        FbankConfig(crop="middle")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"FbankConfig: unknown keys \['bins'\]"):
        FbankConfig.from_dict({"bins": 64})


def test_floor_padding_continues_the_clips_own_silence_not_a_loud_zero(fsdd_dir: Path) -> None:
    # A 0.3 s spoken digit in a 0.64 s window: a third of it or more is padding.
    wave, _ = load_audio(fsdd_dir / "recordings" / "0_theo_0.wav", 16000)
    mean, std = -8.77, 4.64  # FSDD's filterbank statistics
    zeros = FbankConfig(target_length=64, mean=mean, std=std)
    floor = FbankConfig(target_length=64, mean=mean, std=std, pad="floor")
    frames = zeros.num_frames(wave.numel())
    assert frames < 48

    faithful = clip_features(wave, 16000, zeros, train=False)
    quiet = clip_features(wave, 16000, floor, train=False)

    torch.testing.assert_close(faithful[:frames], quiet[:frames])  # speech unchanged
    loud = torch.full_like(faithful[frames:], -mean / (2 * std))
    torch.testing.assert_close(faithful[frames:], loud)  # log-mel 0 reads as +0.95
    lowest = quiet[:frames].min(dim=0).values
    assert torch.equal(quiet[frames:], lowest.expand(64 - frames, -1))
    assert (quiet[frames:] <= faithful[:frames].mean(0)).all()  # never above the speech
    assert quiet[frames:].mean() < faithful[:frames].mean() < faithful[frames:].mean()
    with pytest.raises(ValueError, match="pad"):
        FbankConfig(pad="noise")  # type: ignore[arg-type]
