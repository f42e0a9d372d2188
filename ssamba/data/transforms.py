"""Per-batch work done inside DataLoader workers: crop waves, mix, compute filterbanks.

Cropping happens on the *waveform*, frame-aligned, before the filterbank: Kaldi frames
are computed window by window (each window has its own DC removed), so the frames of a
cropped wave equal the same frames of the full clip, while a 30 s LibriSpeech utterance
cropped to 1024 frames costs a third of the filterbank work.
"""

from __future__ import annotations

import random
import sys
from typing import Any, Literal

import torch

from ssamba.data.shard_format import duration_quantile, fbank_stats
from ssamba.features import (
    AUTO_QUANTILE,
    DATASET_STATS,
    FbankConfig,
    FeatureConfig,
    auto_target_length,
    clip_features,
)

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


def resolve_target_length(target_length: int | str, shard_folder: str | None) -> int:
    """Frames per example: `target_length` as given, or for "auto" the 90th percentile of
    the clip durations in `shard_folder`'s stats.json, rounded up to a multiple of 16 frames
    and capped at 1024 (`ssamba.features.auto_target_length`)."""
    if target_length != "auto":
        return int(target_length)
    if shard_folder is None:
        raise ValueError(
            'data.features.target_length: "auto" reads the clip durations of a shard folder; '
            "none is given"
        )
    return auto_target_length(duration_quantile(shard_folder, AUTO_QUANTILE))


def resolve_features(
    features: FeatureConfig, shard_folder: str | None, **augment: int | bool
) -> FbankConfig:
    """The concrete `FbankConfig` of a recipe's `data.features` for a shard folder (whose
    stats.json gives "shards" normalisation and "auto" lengths); `augment`: FbankConfig's
    training augmentation (freqm, timem, noise). An "auto" length is said on stderr."""
    mean, std = normalisation_stats(features.stats, shard_folder)
    frames = resolve_target_length(features.target_length, shard_folder)
    if features.target_length == "auto":
        seconds = duration_quantile(str(shard_folder), AUTO_QUANTILE)
        print(
            f"data.features.target_length: auto -> {frames} frames ({AUTO_QUANTILE} of the "
            f"clip durations in {shard_folder}: {seconds:.3f} s)",
            file=sys.stderr,
        )
    return FbankConfig(
        target_length=frames,
        num_mel_bins=features.num_mel_bins,
        kind=features.kind,
        num_ceps=features.num_ceps,
        mean=mean,
        std=std,
        pad=features.pad,
        **augment,  # type: ignore[arg-type]
    )


def linked_input_frames(features: Any, shard_folder: str | None) -> int:
    """The encoder's input length for a recipe: its `data.features` (a `FeatureConfig`,
    or the namespace the command line parsed it into) resolved for `shard_folder`; what
    `ssamba pretrain|finetune` link `model.input_frames` to."""
    return resolve_target_length(features.target_length, shard_folder)
