"""Data path throughput: decode + resample + fbank per clip, in one worker process.

What a DataLoader worker does per training sample: decode a 10 s 16 kHz flac from
shard bytes, compute the 1024-frame fbank, SpecAugment, normalise, noise/roll. The
target is >= 40 clips/s per worker, so 4-8 workers keep a GPU pretraining step fed.
Single torch thread, as DataLoader workers run. `ms_per_clip` is the median wall
time; `cpu_ms_per_clip` the process CPU time, which is what an uncontended core would
take when other jobs share the machine (the wall figure then overstates the cost). The 10 s clips are cut from the real
30 s `sample.wav` (`make assets`), plus FSDD recordings concatenated at 8 kHz to time
the resampling path.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path

import numpy as np
import soundfile as sf
import torch

from ssamba.audio import load_audio
from ssamba.bench.report import median_seconds
from ssamba.features import FbankConfig, clip_features

REPO = Path(__file__).resolve().parents[2]
TARGET_CLIPS_PER_S = 40.0
SECONDS = 10


def run(out_dir: Path, quick: bool) -> list[dict]:
    torch.set_num_threads(1)
    clips = _clips()
    repeats = 3 if quick else 7
    train_cfg = FbankConfig(target_length=1024, freqm=48, timem=192, noise=True)
    eval_cfg = FbankConfig(target_length=1024)
    flac = clips["flac 16 kHz"]
    wave, _ = load_audio(flac)
    stages = [
        ("decode", "flac 16 kHz", lambda: load_audio(flac)),
        (
            "decode + resample",
            "wav 44.1 kHz stereo",
            lambda: load_audio(clips["wav 44.1 kHz stereo"]),
        ),
        ("decode + resample", "wav 8 kHz (FSDD)", lambda: load_audio(clips["wav 8 kHz"])),
        ("fbank (eval)", "16 kHz wave", lambda: clip_features(wave, 16000, eval_cfg, train=False)),
        (
            "fbank + augment (train)",
            "16 kHz wave",
            lambda: clip_features(wave, 16000, train_cfg, train=True),
        ),
        (
            "decode + fbank + augment",
            "flac 16 kHz",
            lambda: clip_features(load_audio(flac)[0], 16000, train_cfg, train=True),
        ),
        (
            "decode + resample + fbank + augment",
            "wav 8 kHz (FSDD)",
            lambda: clip_features(load_audio(clips["wav 8 kHz"])[0], 16000, train_cfg, train=True),
        ),
    ]
    rows = []
    for stage, source, fn in stages:
        cpu_start = time.process_time()
        seconds = median_seconds(lambda fn=fn: [fn() for _ in range(5)], repeats=repeats) / 5
        cpu = (time.process_time() - cpu_start) / (5 * (repeats + 1))
        rows.append(
            {
                "stage": stage,
                "input (10 s clip)": source,
                "ms_per_clip": seconds * 1000,
                "cpu_ms_per_clip": cpu * 1000,
                "clips_per_s_per_worker": 1 / seconds,
                "target": f">= {TARGET_CLIPS_PER_S:.0f}"
                if "decode +" in stage and "fbank" in stage
                else "",
            }
        )
    return rows


def _clips() -> dict[str, bytes]:
    """10 s test clips as file bytes, encoded in memory."""
    sample = Path(os.environ.get("SSAMBA_SAMPLE_WAV", REPO / "work" / "assets" / "sample.wav"))
    if not sample.is_file():
        raise FileNotFoundError(f"{sample} missing: run `make assets`")
    audio, sr = sf.read(sample, dtype="float32")
    ten = audio[: SECONDS * sr]
    fsdd = (
        Path(os.environ.get("SSAMBA_FSDD", REPO.parent / "shared" / "data" / "fsdd")) / "recordings"
    )
    digits = [sf.read(p, dtype="float32")[0] for p in sorted(fsdd.glob("*.wav"))[:40]]
    if not digits:
        raise FileNotFoundError(f"{fsdd}: no FSDD recordings (set SSAMBA_FSDD)")
    eight_k = np.concatenate(digits)[: SECONDS * 8000]
    stereo_44k = np.repeat(np.stack([ten, 0.5 * ten], axis=1), 3, axis=0)[: SECONDS * 44100]
    return {
        "flac 16 kHz": _encode(ten, sr, "FLAC"),
        "wav 44.1 kHz stereo": _encode(stereo_44k, 44100, "WAV"),
        "wav 8 kHz": _encode(eight_k, 8000, "WAV"),
    }


def _encode(data: np.ndarray, sr: int, fmt: str) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, data, sr, format=fmt, subtype="PCM_16")
    return buffer.getvalue()
