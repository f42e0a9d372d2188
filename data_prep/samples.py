"""What one sample in a shard looks like: `<key>.flac` (16 kHz mono PCM16) + `<key>.json`.

The writer (`shard.py`), the statistics (`stats.py`) and tests share this one
definition; the DataModules read the same two fields.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import webdataset as wds

SAMPLE_RATE = 16000
_UNSAFE_KEY_CHARS = re.compile(r"[^\w\-/]")


def encode_flac(wave: torch.Tensor) -> bytes:
    """wave: (samples,) float in [-1, 1] -> 16 kHz PCM16 flac bytes (clipped, not wrapped)."""
    pcm = np.clip(np.round(wave.numpy() * 32768.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def sample_key(clip_id: str) -> str:
    """WebDataset splits key and extension at the first dot, so keys must not hold one."""
    return _UNSAFE_KEY_CHARS.sub("_", clip_id)


def sample_meta(record: dict, duration: float) -> dict:
    """The json of a sample: manifest fields plus the decoded duration in seconds."""
    meta = {
        "id": record["id"],
        "labels": record["labels"],
        "duration": duration,
        "source": record["path"],
        "split": record["split"],
        "sample_rate": SAMPLE_RATE,
    }
    meta.update({k: record[k] for k in ("fold", "speaker") if k in record})
    return meta


def iter_shard(path: Path) -> Iterator[tuple[dict, bytes]]:
    """(json metadata, flac bytes) of every sample of one tar, in stored order."""
    for sample in wds.WebDataset(str(path), shardshuffle=False):
        yield json.loads(sample["json"]), sample["flac"]
