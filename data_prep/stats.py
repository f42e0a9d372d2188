"""Filterbank mean/std of a corpus (the `mean`, `std` of `FbankConfig`), and stats.json.

The moments are taken over every (frame, mel bin) value of the raw log-mel filterbank
of the real frames of each measured clip - not over zero padding, which the originals'
`get_norm_stats.py` included (ast#48) and which drags the mean towards 0 for short
clips. Sums are kept in float64 so millions of clips merge without drift.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.parallel import map_unordered
from data_prep.samples import iter_shard
from ssamba.audio import load_audio
from ssamba.features import FbankConfig, wav_to_fbank

# Raw filterbank of the whole clip, the settings the models use (REFERENCE.md A).
RAW_FBANK = FbankConfig(target_length=None)


@dataclass
class FbankMoments:
    """Running sums of the fbank values of `clips` clips (float64 sums)."""

    clips: int = 0
    values: int = 0
    total: float = 0.0
    total_sq: float = 0.0

    def add(self, other: FbankMoments) -> None:
        self.clips += other.clips
        self.values += other.values
        self.total += other.total
        self.total_sq += other.total_sq

    @property
    def mean(self) -> float | None:
        return self.total / self.values if self.values else None

    @property
    def std(self) -> float | None:
        if not self.values:
            return None
        return math.sqrt(max(self.total_sq / self.values - self.mean**2, 0.0))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> FbankMoments:
        return cls(**data)


def clip_moments(wave: torch.Tensor, sr: int) -> FbankMoments:
    """Moments of one clip's raw fbank; wave: (samples,) at 16 kHz."""
    fbank = wav_to_fbank(wave, sr, RAW_FBANK).double()
    return FbankMoments(1, fbank.numel(), float(fbank.sum()), float((fbank * fbank).sum()))


def write_stats(out_dir: Path, index: dict, moments: FbankMoments, rejects: int) -> dict:
    """stats.json: counts, hours and the fbank mean/std (with how many clips they cover)."""
    splits = index["splits"]
    stats = {
        "clips": index["clips"],
        "hours": sum(s["hours"] for s in splits.values()),
        "splits": {name: s["clips"] for name, s in splits.items()},
        "rejects": rejects,
        "fbank_mean": moments.mean,
        "fbank_std": moments.std,
        "fbank_clips": moments.clips,
        "fbank": "kaldi fbank 128 mel, 25 ms / 10 ms, hanning, htk, DC removed, real frames only",
    }
    (Path(out_dir) / "stats.json").write_text(json.dumps(stats, indent=1))
    return stats


def compute_stats(shard_dir: Path, workers: int = 1, max_clips: int | None = None) -> dict:
    """Recompute the fbank mean/std from the shards themselves and rewrite stats.json.

    Measures every clip, or every `ceil(clips / max_clips)`-th clip of each shard.
    """
    shard_dir = Path(shard_dir)
    index_path = shard_dir / "index.json"
    if not index_path.exists():
        raise FileNotFoundError(f"{index_path} not found: is {shard_dir} a shard folder?")
    index = json.loads(index_path.read_text())
    stride = max(1, math.ceil(index["clips"] / max_clips)) if max_clips else 1
    tars = [shard_dir / s["file"] for split in index["splits"].values() for s in split["shards"]]
    jobs = [(path, stride) for path in tars]
    moments = FbankMoments()
    for part in map_unordered(_shard_moments, jobs, workers):
        moments.add(part)
    stats_path = shard_dir / "stats.json"
    rejects = json.loads(stats_path.read_text())["rejects"] if stats_path.exists() else 0
    stats = write_stats(shard_dir, index, moments, rejects)
    print(
        f"fbank mean {stats['fbank_mean']:.6f} std {stats['fbank_std']:.6f} over "
        f"{moments.clips} clips -> {stats_path}"
    )
    return stats


def _shard_moments(job: tuple[Path, int]) -> FbankMoments:
    path, stride = job
    moments = FbankMoments()
    for i, (meta, flac) in enumerate(iter_shard(path)):
        if i % stride == 0:
            wave, sr = load_audio(flac, name=f"{path.name}:{meta['id']}")
            moments.add(clip_moments(wave, sr))
    return moments
