"""Per-batch work done inside DataLoader workers: crop waves, mix, compute filterbanks.

Cropping happens on the *waveform*, frame-aligned, before the filterbank: Kaldi frames
are computed window by window (each window has its own DC removed), so the frames of a
cropped wave equal the same frames of the full clip, while a 30 s LibriSpeech utterance
cropped to 1024 frames costs a third of the filterbank work.
"""

from __future__ import annotations

import random
from typing import Literal

import torch

from ssamba.data.shard_format import fbank_stats
from ssamba.features import DATASET_STATS, FbankConfig, clip_features

CropPosition = Literal["random", "start", "center"]


def samples_for_frames(cfg: FbankConfig, frames: int) -> int:
    """Samples Kaldi needs to produce exactly `frames` frames (snip_edges)."""
    shift = int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return cfg.frame_length_samples + shift * (frames - 1)


def crop_wave(
    wave: torch.Tensor, cfg: FbankConfig, position: CropPosition, rng: random.Random
) -> torch.Tensor:
    """The part of wave (samples,) that yields `cfg.target_length` frames, frame-aligned.

    Shorter waves come back whole (the filterbank is zero-padded later, as the originals
    do). `random` draws the first frame uniformly, like cropping the filterbank would.
    """
    if cfg.target_length is None:
        return wave
    needed = samples_for_frames(cfg, cfg.target_length)
    spare_frames = cfg.num_frames(wave.numel()) - cfg.target_length
    if spare_frames <= 0:
        return wave
    if position == "random":
        first = rng.randint(0, spare_frames)
    elif position == "center":
        first = spare_frames // 2
    else:
        first = 0
    start = first * int(cfg.sample_rate * cfg.frame_shift_ms / 1000)
    return wave[start : start + needed]


def batch_features(
    waves: list[torch.Tensor], cfg: FbankConfig, train: bool
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Filterbanks of a list of waves: (batch, target_length, bins), frames (batch,), indices kept.

    `frames` counts each clip's own frames, at most `target_length`: the rest of its window
    is padding, which ClassifyTask with `ignore_padding` keeps out of pooling.
    A wave whose filterbank is not finite is left out (its index missing from the list),
    so the caller can count it; `train` applies SpecAugment / noise as `cfg` says.
    """
    feats, frames, kept = [], [], []
    for i, wave in enumerate(waves):
        fbank = clip_features(wave, cfg.sample_rate, cfg, train=train)
        if torch.isfinite(fbank).all():
            feats.append(fbank)
            frames.append(min(cfg.num_frames(wave.numel()), fbank.shape[0]))
            kept.append(i)
    if not feats:
        empty = torch.empty(0, cfg.target_length or 0, cfg.feature_dim)
        return empty, torch.empty(0, dtype=torch.long), kept
    return torch.stack(feats), torch.tensor(frames, dtype=torch.long), kept


def normalisation_stats(
    stats: str | tuple[float, float], shard_folder: str | None
) -> tuple[float, float]:
    """(mean, std) for `FbankConfig` from a recipe's `stats` value.

    "shards": the stats.json the shard writer measured for `shard_folder`; a `DATASET_STATS` name
    ("asli", "esc50", ...): the originals' published values (needed to reuse their
    checkpoints); a [mean, std] pair: as given.
    """
    if not isinstance(stats, str):
        mean, std = stats
        return float(mean), float(std)
    if stats == "shards":
        if shard_folder is None:
            raise ValueError('stats: "shards" needs a single shard folder; name a dataset instead')
        return fbank_stats(shard_folder)
    if stats not in DATASET_STATS:
        raise ValueError(
            f'stats: {stats!r} is not "shards", [mean, std] or one of {sorted(DATASET_STATS)}'
        )
    return DATASET_STATS[stats]
