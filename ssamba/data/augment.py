"""Augmentation of the pretraining inputs (`data.augment` of a pretraining recipe).

What a clip goes through in training, inside the DataLoader workers, before and after its
filterbank (`PretrainDataModule`'s batch builder):

    wave -> gain (uniform in +-gain_db)                       the clip's level
         -> time shift (uniform in +-shift_ms, zeros fill in)  where it sits in the window
         -> [clean copy, when clean_targets]
         -> with probability mix_prob: another clip of the batch added as noise at an SNR
            drawn uniformly from snr_db (the partner cut or zero-padded to the clip)
    fbank -> frequency stretch (a factor uniform in `stretch`, the same for the clean copy)

The mixing is the "background noise mixed into the inputs" of M2D-X-style further
pretraining: the student must describe the clip, not the mixture. With `clean_targets`
the batch also carries `clean` (the same clip, gain, shift and stretch, without the
mixed-in noise), which MSPM reconstructs and the teacher-student objective's teacher
encodes. Everything is off by default, and validation is never augmented.

Waves are mono `(samples,)`; filterbanks `(frames, bins)`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "augment_waves",
    "mix_at_snr",
    "scale_gain",
    "shift_wave",
    "stretch_bins",
    "stretch_factors",
]


@dataclass(frozen=True)
class AugmentConfig:
    """Pretraining input augmentation; the defaults change nothing.

    mix_prob: probability that a clip gets another clip of its batch mixed in as noise.
    snr_db: (low, high) signal-to-noise ratio of that mixture in dB, drawn uniformly.
    gain_db: the clip's level is scaled by a gain drawn uniformly in [-gain_db, gain_db] dB.
    shift_ms: the clip is shifted in time by up to this many ms either way (a delay adds
        silence at the start, an advance drops its start).
    stretch: (low, high) factor of a frequency stretch of the filterbank along its mel
        bins (1.0 = none; 1.1 moves a bin's content 10% higher); None: off.
    clean_targets: also give the un-noised clip (`clean`) for the objective's targets.
    """

    mix_prob: float = 0.0
    snr_db: tuple[float, float] = (0.0, 20.0)
    gain_db: float = 0.0
    shift_ms: float = 0.0
    stretch: tuple[float, float] | None = None
    clean_targets: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.mix_prob <= 1.0:
            raise ValueError(f"data.augment.mix_prob: a probability in [0, 1], got {self.mix_prob}")
        low, high = self.snr_db
        if low > high:
            raise ValueError(
                f"data.augment.snr_db: (low, high) with low <= high, got {self.snr_db}"
            )
        if self.gain_db < 0 or self.shift_ms < 0:
            raise ValueError(
                f"data.augment: gain_db and shift_ms are ranges (>= 0), got {self.gain_db}, "
                f"{self.shift_ms}"
            )
        if self.stretch is not None and not 0 < self.stretch[0] <= self.stretch[1]:
            raise ValueError(f"data.augment.stretch: 0 < low <= high, got {self.stretch}")
        object.__setattr__(self, "snr_db", tuple(self.snr_db))  # YAML gives lists
        if self.stretch is not None:
            object.__setattr__(self, "stretch", tuple(self.stretch))

    @property
    def active(self) -> bool:
        """Whether anything is done at all."""
        return bool(self.mix_prob or self.gain_db or self.shift_ms or self.stretch)


def scale_gain(wave: torch.Tensor, gain_db: float) -> torch.Tensor:
    """wave (samples,) scaled by gain_db decibels: amplitude x 10^(gain_db / 20)."""
    return wave * 10.0 ** (gain_db / 20.0)


def shift_wave(wave: torch.Tensor, samples: int) -> torch.Tensor:
    """wave (samples,) moved `samples` later (earlier when negative), same length, the
    vacated part silent: a click at sample k ends up at k + samples."""
    if samples == 0:
        return wave
    shifted = torch.zeros_like(wave)
    if samples > 0:
        shifted[samples:] = wave[: max(0, wave.numel() - samples)]
    else:
        shifted[: max(0, wave.numel() + samples)] = wave[-samples:]
    return shifted


def mix_at_snr(wave: torch.Tensor, noise: torch.Tensor, snr_db: float) -> torch.Tensor:
    """wave + noise scaled so that power(wave) / power(scaled noise) = 10^(snr_db / 10).

    wave: (samples,); noise: (any,), cut or zero-padded to the wave's length; powers are
    mean squares of the DC-free signals over the wave's span. A silent noise (or wave)
    leaves the wave as it is.
    """
    wave = wave - wave.mean()
    noise = noise - noise.mean()
    if noise.numel() < wave.numel():
        noise = F.pad(noise, (0, wave.numel() - noise.numel()))
    noise = noise[: wave.numel()]
    signal_power, noise_power = wave.square().mean(), noise.square().mean()
    if signal_power <= 0 or noise_power <= 0:
        return wave
    scale = torch.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))
    return wave + scale * noise


def stretch_bins(fbank: torch.Tensor, factor: float) -> torch.Tensor:
    """Stretch a filterbank along its bins by `factor`: (frames, bins) -> same shape.

    Bin b's content moves to about b * factor (linear interpolation); a factor above 1
    cuts the top bins off, below 1 fills them with the highest remaining bin.
    """
    bins = fbank.shape[-1]
    size = max(1, round(bins * factor))
    # frames as channels: the interpolation runs along the bins
    stretched = F.interpolate(fbank[None], size=size, mode="linear", align_corners=True)[0]
    if size >= bins:
        return stretched[:, :bins]
    return torch.cat([stretched, stretched[:, -1:].expand(-1, bins - size)], dim=1)


def augment_waves(
    waves: list[torch.Tensor], cfg: AugmentConfig, sample_rate: int, rng: random.Random
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(clean, noisy) waves of a batch: gain and shift for both, the mixing for `noisy`.

    Each clip's partner is another clip of the same batch (the batch is a random draw);
    a batch of one clip is never mixed.
    """
    clean = []
    for wave in waves:
        if cfg.gain_db:
            wave = scale_gain(wave, rng.uniform(-cfg.gain_db, cfg.gain_db))
        if cfg.shift_ms:
            most = math.floor(cfg.shift_ms * sample_rate / 1000)
            wave = shift_wave(wave, rng.randint(-most, most))
        clean.append(wave)
    noisy = list(clean)
    for i in range(len(clean)):
        if len(clean) < 2 or rng.random() >= cfg.mix_prob:
            continue
        j = rng.choice([k for k in range(len(clean)) if k != i])
        noisy[i] = mix_at_snr(clean[i], clean[j], rng.uniform(*cfg.snr_db))
    return clean, noisy


def stretch_factors(cfg: AugmentConfig, count: int, rng: random.Random) -> list[float]:
    """One frequency-stretch factor per clip (1.0 each when `stretch` is off)."""
    if cfg.stretch is None:
        return [1.0] * count
    return [rng.uniform(*cfg.stretch) for _ in range(count)]
