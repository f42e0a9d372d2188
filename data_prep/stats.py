"""Feature mean/std of a corpus (the `mean`, `std` of `FbankConfig`), and stats.json.

The moments are taken over every (frame, mel bin) value of the raw log-mel filterbank
of the real frames of each measured clip - not over zero padding, which the originals'
`get_norm_stats.py` included (ast#48) and which drags the mean towards 0 for short
clips. Sums are kept in float64 so millions of clips merge without drift.

MFCC-grams have statistics of their own (`kind="mfcc"`): `fbank_mean`/`fbank_std` stay,
and `mfcc_mean`, `mfcc_std`, `mfcc_num_ceps`, `mfcc_clips` are added to stats.json:

    python -m data_prep stats --shards work/shards/fsdd --kind mfcc --num-ceps 40

A recipe then passes them as `data.features.stats: [mean, std]` (the shard writer measures fbank only).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.parallel import map_unordered
from ssamba.audio import load_audio
from ssamba.data.shard_format import STATS_NAME, read_index, read_stats, write_stats
from ssamba.data.shards import RawClip, iter_shard
from ssamba.features import FbankConfig, wav_to_fbank

# Raw filterbank of the whole clip, the settings the models use (docs/originals.md#features).
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


def raw_features(kind: str = "fbank", num_ceps: int = 40) -> FbankConfig:
    """The whole clip's raw features of one kind, as the models compute them."""
    return (
        RAW_FBANK
        if kind == "fbank"
        else FbankConfig(target_length=None, kind=kind, num_ceps=num_ceps)
    )


def clip_moments(wave: torch.Tensor, sr: int, cfg: FbankConfig = RAW_FBANK) -> FbankMoments:
    """Moments of one clip's raw features (fbank unless `cfg` says); wave: (samples,) at 16 kHz."""
    fbank = wav_to_fbank(wave, sr, cfg).double()
    return FbankMoments(1, fbank.numel(), float(fbank.sum()), float((fbank * fbank).sum()))


DURATION_QUANTILES = {"p10": 0.1, "p50": 0.5, "p90": 0.9, "p95": 0.95, "max": 1.0}


def duration_quantiles(seconds: list[float]) -> dict[str, float] | None:
    """stats.json's "durations": quantiles of the clip durations in seconds (linear
    interpolation between clips) and the clip count; None without clips."""
    if not seconds:
        return None
    values = torch.tensor(seconds, dtype=torch.float64)
    levels = torch.tensor(list(DURATION_QUANTILES.values()), dtype=torch.float64)
    found = torch.quantile(values, levels).tolist()
    return {
        **{name: round(v, 4) for name, v in zip(DURATION_QUANTILES, found, strict=True)},
        "clips": len(seconds),
    }


def summarise_stats(
    out_dir: Path,
    index: dict,
    moments: FbankMoments,
    rejects: int,
    durations: list[float] | None,
) -> dict:
    """stats.json: counts, hours, the fbank mean/std (with how many clips they cover) and
    the quantiles of the clip durations (`None`: not known, left out)."""
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
    quantiles = duration_quantiles(durations or [])
    if quantiles is not None:
        stats["durations"] = quantiles
    write_stats(out_dir, stats)
    return stats


def compute_stats(
    shard_dir: Path,
    workers: int = 1,
    max_clips: int | None = None,
    kind: str = "fbank",
    num_ceps: int = 40,
) -> dict:
    """Recompute the fbank (or MFCC) mean/std from the shards themselves into stats.json.

    Measures every clip, or every `ceil(clips / max_clips)`-th clip of each shard. With
    `kind="mfcc"` the fbank entries are kept and `mfcc_*` entries added (replaced).
    """
    shard_dir = Path(shard_dir)
    shards = read_index(shard_dir)
    if shards is None:
        raise FileNotFoundError(f"{shard_dir}: no index.json; is it a shard folder?")
    index = json.loads((shard_dir / "index.json").read_text())
    stride = max(1, math.ceil(index["clips"] / max_clips)) if max_clips else 1
    cfg = raw_features(kind, num_ceps)
    jobs = [(shard_dir / file, stride, cfg) for entries in shards.values() for file, _ in entries]
    moments, durations = FbankMoments(), []
    for part, seconds in map_unordered(_shard_moments, jobs, workers):
        moments.add(part)
        durations += seconds
    stats_path = shard_dir / STATS_NAME
    if kind == "mfcc":
        stats = read_stats(shard_dir) if stats_path.exists() else {}
        stats |= {
            "mfcc_mean": moments.mean,
            "mfcc_std": moments.std,
            "mfcc_num_ceps": num_ceps,
            "mfcc_clips": moments.clips,
            "mfcc": f"kaldi mfcc {num_ceps} ceps over the fbank frames, real frames only",
        }
        write_stats(shard_dir, stats)
        print(
            f"mfcc ({num_ceps} ceps) mean {moments.mean:.6f} std {moments.std:.6f} over "
            f"{moments.clips} clips -> {stats_path}; recipes: data.features.stats: "
            f"[{moments.mean:.6f}, {moments.std:.6f}]"
        )
        return stats
    rejects = read_stats(shard_dir)["rejects"] if stats_path.exists() else 0
    stats = summarise_stats(shard_dir, index, moments, rejects, durations)
    print(
        f"fbank mean {stats['fbank_mean']:.6f} std {stats['fbank_std']:.6f} over "
        f"{moments.clips} clips -> {stats_path}"
    )
    return stats


def clip_seconds(clip: RawClip, path: Path) -> float:
    """A clip's duration: its json's `duration` (the writer's), else decoded from its audio."""
    seconds = clip.meta.get("duration")
    if isinstance(seconds, int | float) and seconds > 0:
        return float(seconds)
    wave, sr = load_audio(clip.audio, name=f"{path.name}:{clip.key}")
    return wave.numel() / sr


def _shard_moments(job: tuple[Path, int, FbankConfig]) -> tuple[FbankMoments, list[float]]:
    """Moments of every `stride`-th clip of a shard, and every clip's duration (seconds)."""
    path, stride, cfg = job
    moments, durations = FbankMoments(), []
    for i, clip in enumerate(iter_shard(str(path))):
        if clip.audio is None:
            continue
        if i % stride == 0:
            wave, sr = load_audio(clip.audio, name=f"{path.name}:{clip.key}")
            moments.add(clip_moments(wave, sr, cfg))
            durations.append(wave.numel() / sr)
        else:  # the writer's json says how long the clip is; decode only if it does not
            durations.append(clip_seconds(clip, path))
    return moments, durations
