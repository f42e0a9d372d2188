"""Augmentation of the pretraining inputs (`data.augment`): each augmentation's effect on a
known input, the batches it builds, and that the objectives' targets stay clean."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from ssamba.audio import load_audio
from ssamba.data.augment import (
    AugmentConfig,
    augment_waves,
    mix_at_snr,
    scale_gain,
    shift_wave,
    stretch_bins,
)
from ssamba.data.pretrain import FbankBatch
from ssamba.data.streams import Clip
from ssamba.data.transforms import batch_features, crop_wave
from ssamba.features import FbankConfig
from ssamba.models.encoder import EncoderConfig
from ssamba.tasks.objectives.eat import EATConfig
from ssamba.tasks.pretrain import MSPMConfig, PretrainTask

SR = 16000
FBANK = FbankConfig(target_length=64, mean=-8.77, std=4.64, pad="floor")
TINY = EncoderConfig(family="ssamba", depth=2, embed_dim=32, input_frames=64)


def power(x: torch.Tensor) -> float:
    return float((x - x.mean()).square().mean())


@pytest.fixture(scope="module")
def digits(fsdd_dir: Path) -> list[torch.Tensor]:
    """Four real spoken digits, (samples,) each at 16 kHz."""
    names = [f"{d}_jackson_3.wav" for d in (0, 2, 4, 6)]
    return [load_audio(fsdd_dir / "recordings" / name)[0] for name in names]


# ------------------------------------------------------------------ each augmentation
@pytest.mark.parametrize("snr", [-5.0, 0.0, 10.0, 20.0])
def test_mixing_at_snr_gives_that_power_ratio(digits, snr):
    wave, noise = digits[0], digits[1]
    mixed = mix_at_snr(wave, noise, snr)
    added = mixed - (wave - wave.mean())
    assert mixed.shape == wave.shape
    assert 10 * math.log10(power(wave) / power(added)) == pytest.approx(snr, abs=1e-3)


def test_mixing_silence_changes_nothing_and_a_short_partner_is_zero_padded(digits):
    wave = digits[0]
    silent = mix_at_snr(wave, torch.zeros(100), 0.0)
    torch.testing.assert_close(silent, wave - wave.mean())
    short = digits[1][:1000]
    added = mix_at_snr(wave, short, 0.0) - (wave - wave.mean())
    assert float(added[2000:].abs().max()) < 1e-3  # only the DC of the padded partner


@pytest.mark.parametrize("gain", [-12.0, -3.0, 0.0, 6.0])
def test_gain_of_g_db_scales_the_amplitude_by_10_to_the_g_over_20(digits, gain):
    wave = digits[2]
    torch.testing.assert_close(scale_gain(wave, gain), wave * 10 ** (gain / 20))
    ratio = power(scale_gain(wave, gain)) / power(wave)
    assert 10 * math.log10(ratio) == pytest.approx(gain, abs=1e-4)


@pytest.mark.parametrize("shift", [800, -800, 0])
def test_shift_moves_a_click(shift):
    click = torch.zeros(8000)
    click[4000] = 1.0
    moved = shift_wave(click, shift)
    assert moved.shape == click.shape
    assert int(moved.argmax()) == 4000 + shift and float(moved.sum()) == 1.0
    assert float(shift_wave(click, 9000).abs().sum()) == 0.0  # shifted out entirely


def test_frequency_stretch_moves_a_bins_content_up_or_down():
    fbank = torch.zeros(10, 128)
    fbank[:, 40] = 1.0
    assert int(stretch_bins(fbank, 1.25)[0].argmax()) == 50
    assert int(stretch_bins(fbank, 0.75)[0].argmax()) == 30
    assert stretch_bins(fbank, 0.75).shape == fbank.shape
    torch.testing.assert_close(stretch_bins(fbank, 1.0), fbank)


def test_gain_and_shift_reach_the_clean_copy_the_noise_only_the_noisy_one(digits):
    cfg = AugmentConfig(mix_prob=1.0, snr_db=(5.0, 5.0), gain_db=6.0, shift_ms=20.0)
    clean, noisy = augment_waves(digits, cfg, SR, random.Random(0))
    for original, c, n in zip(digits, clean, noisy, strict=True):
        # gain within +-6 dB, shift within 320 samples: the clean copy is the clip, moved
        gain_db = 10 * math.log10(power(c) / power(original))
        assert -6.5 < gain_db < 6.5
        assert 10 * math.log10(power(c) / power(n - (c - c.mean()))) == pytest.approx(5.0, abs=1e-3)


def test_nothing_happens_by_default_and_validation_is_never_augmented(digits):
    assert not AugmentConfig().active
    clips = [Clip(f"c{i}", w, {}) for i, w in enumerate(digits)]
    cfg = AugmentConfig(mix_prob=1.0, gain_db=6.0, clean_targets=True)
    plain = FbankBatch(FBANK, "start", train=False)(clips, random.Random(0))[0]
    checked = FbankBatch(FBANK, "start", train=False, augment=cfg)(clips, random.Random(0))[0]
    assert plain is not None and checked is not None
    assert torch.equal(plain["fbank"], checked["fbank"]) and "clean" not in checked


# ------------------------------------------------------------------ batches and targets
def test_batches_carry_clean_targets_of_the_unmixed_clips(digits):
    clips = [Clip(f"c{i}", w, {}) for i, w in enumerate(digits)]
    cfg = AugmentConfig(mix_prob=1.0, snr_db=(0.0, 0.0), clean_targets=True)
    batch, rejected = FbankBatch(FBANK, "start", train=True, augment=cfg)(clips, random.Random(1))
    assert batch is not None and not rejected
    cropped = [crop_wave(w, FBANK, "start", random.Random(0)) for w in digits]
    expected, _, _ = batch_features(cropped, FBANK, train=True)
    torch.testing.assert_close(batch["clean"], expected)  # the clips as they are
    assert not torch.allclose(batch["fbank"], expected)  # the student's input is mixed
    assert batch["fbank"].shape == batch["clean"].shape == (4, 64, 128)


def test_mspm_reconstructs_the_clean_input_while_the_encoder_reads_the_noisy_one(digits):
    torch.manual_seed(0)
    task = PretrainTask(TINY, objective=MSPMConfig(n_masked=10, cluster_sizes=(2,))).eval()
    clean = batch_features(digits[:1], FBANK, train=False)[0]
    noisy = batch_features([mix_at_snr(digits[0], digits[1], 0.0)], FBANK, train=False)[0]
    with torch.no_grad():
        out = task.mspm(noisy, 10, torch.Generator().manual_seed(3), clean=clean)
        plain = task.mspm(noisy, 10, torch.Generator().manual_seed(3))
    targets = task.encoder.unfold_patches(clean)[0][out.mask]
    mse = (out.reconstruction - targets).square().mean()
    assert float(out.metrics["mse"]) == pytest.approx(float(mse), rel=1e-5)
    # same masks and the same encoder input: only the targets differ
    assert torch.equal(out.mask, plain.mask) and torch.equal(
        out.reconstruction, plain.reconstruction
    )
    assert float(out.metrics["mse"]) != pytest.approx(float(plain.metrics["mse"]), rel=1e-3)


def test_the_teacher_encodes_the_clean_input(digits):
    torch.manual_seed(0)
    eat = EATConfig(top_k=1, clones=2, mask_ratio=0.5)
    task = PretrainTask(TINY, objective=eat).eval()
    clean = batch_features(digits[:2], FBANK, train=False)[0]
    noisy = batch_features(
        [mix_at_snr(digits[0], digits[2], 0.0), mix_at_snr(digits[1], digits[3], 0.0)],
        FBANK,
        train=False,
    )[0]

    def loss(student_input, teacher_input=None):
        with torch.no_grad():
            generator = torch.Generator().manual_seed(0)
            return float(task.eat(task.encoder, student_input, generator, teacher_input).loss)

    assert loss(noisy, noisy) == pytest.approx(loss(noisy), rel=1e-6)
    assert loss(noisy, clean) != pytest.approx(loss(noisy), rel=1e-3)
    # the teacher's targets come from its input alone: a clean teacher input gives the
    # same targets whatever the student reads
    frames, _ = task.eat.targets(clean)
    frames_again, _ = task.eat.targets(clean.clone())
    torch.testing.assert_close(frames, frames_again)


def test_bad_augmentation_settings_are_named():
    with pytest.raises(ValueError, match=r"data\.augment\.mix_prob"):
        AugmentConfig(mix_prob=1.5)
    with pytest.raises(ValueError, match=r"data\.augment\.snr_db"):
        AugmentConfig(snr_db=(10.0, 0.0))
    with pytest.raises(ValueError, match=r"data\.augment\.stretch"):
        AugmentConfig(stretch=(0.0, 1.1))
