"""Decode one clip into the waveform every other part of ssamba expects.

`load_audio` is the single door through which audio enters: shard writing, the
DataModules (inside DataLoader workers, so it stays lean: one soundfile read, one
resample) and `ssamba embed`. It returns mono float32 at the target rate or raises
`AudioError` naming the clip and what is wrong with it, so a corpus of millions can
reject and count bad clips instead of crashing deep inside torchaudio.
"""

from __future__ import annotations

import functools
import io
import re
import struct
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

# File name suffixes (lower case) of the containers the bundled libsndfile 1.2 decodes:
# what `ssamba shard --corpus folder` takes and `ssamba embed` looks for in a folder.
AUDIO_EXTENSIONS = frozenset(
    {
        ".wav",
        ".wave",
        ".flac",
        ".ogg",
        ".oga",
        ".opus",
        ".mp3",
        ".aiff",
        ".aif",
        ".aifc",
        ".au",
        ".snd",
        ".caf",
        ".w64",
        ".rf64",
    }
)
# Shorter than one 25 ms analysis frame gives zero filterbank frames.
MIN_SECONDS = 0.025
# libsndfile reads a cut-off WAV without complaint but logs "data : <declared> (should be <n>)".
_WAV_DATA_SIZE = re.compile(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", re.MULTILINE)
# Streaming writers leave the size unknown (0 or all ones); that is not truncation.
_UNKNOWN_SIZES = {0, 0xFFFFFFFF, 0xFFFFFFFF - 8}


class AudioError(ValueError):
    """A clip that cannot become a waveform; the message starts with the clip's name."""


def load_audio(
    source: str | Path | bytes,
    target_sr: int = 16000,
    name: str | None = None,
) -> tuple[torch.Tensor, int]:
    """Decode any of `AUDIO_EXTENSIONS` (path or bytes), downmix to mono, resample, validate.

    Returns (wave: (samples,) float32 in [-1, 1], target_sr). `name` labels the clip in
    error messages (defaults to the path, or "<bytes>").
    Raises AudioError for: missing file, undecodable/corrupt/truncated data, sample
    rate 0, no samples, NaN/inf, all-zero (silent) audio, or less than 25 ms.
    """
    if target_sr <= 0:
        raise ValueError(f"load_audio: target_sr must be > 0, got {target_sr}")
    label = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    data, sr = _decode(source, label)
    wave = _validate(data, sr, label)
    if sr != target_sr:
        wave = _resampler(sr, target_sr)(wave)
    return wave, target_sr


@functools.lru_cache(maxsize=16)
def _resampler(orig_sr: int, target_sr: int) -> torchaudio.transforms.Resample:
    """The sinc kernel of a rate pair, built once per worker: half the cost of a resample.

    Same defaults as `torchaudio.functional.resample`, so the output is identical.
    """
    return torchaudio.transforms.Resample(orig_sr, target_sr)


def _decode(source: str | Path | bytes, label: str) -> tuple[np.ndarray, int]:
    """data: (frames, channels) float32 exactly as stored, with its sample rate."""
    if isinstance(source, bytes):
        if not source:
            raise AudioError(f"{label}: empty (0 bytes)")
        handle: io.BytesIO | str = io.BytesIO(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{label}: file not found")
        if path.stat().st_size == 0:
            raise AudioError(f"{label}: empty (0 bytes)")
        handle = str(path)
    try:
        with sf.SoundFile(handle) as f:
            if f.samplerate <= 0:
                raise AudioError(f"{label}: sample rate {f.samplerate} Hz")
            declared, fmt = f.frames, f.format
            if fmt in ("WAV", "WAVEX"):
                _check_wav_complete(f.extra_info, label)
            data = f.read(dtype="float32", always_2d=True)
            sr = f.samplerate
    except AudioError:
        raise
    except (sf.SoundFileError, RuntimeError, ValueError, EOFError) as err:
        if _wav_header_rate(source) == 0:
            raise AudioError(f"{label}: sample rate 0 Hz") from err
        raise AudioError(f"{label}: cannot decode ({_first_line(err)})") from err
    # MP3 frame counts are estimates; every other format declares the exact length.
    if fmt != "MP3" and data.shape[0] < declared:
        raise AudioError(
            f"{label}: truncated (header declares {declared} frames, decoded {data.shape[0]})"
        )
    return data, sr


def _check_wav_complete(extra_info: str, label: str) -> None:
    match = _WAV_DATA_SIZE.search(extra_info)
    if match:
        declared, present = int(match[1]), int(match[2])
        if declared > present and declared not in _UNKNOWN_SIZES:
            raise AudioError(
                f"{label}: truncated (header declares {declared} data bytes, file holds {present})"
            )


def _wav_header_rate(source: str | Path | bytes) -> int | None:
    """Sample rate field of a RIFF/WAVE header, to name the cause libsndfile hides."""
    if isinstance(source, bytes):
        head = source[:64]
    else:
        with Path(source).open("rb") as f:
            head = f.read(64)
    at = head.find(b"fmt ")
    if not head.startswith(b"RIFF") or at < 0 or len(head) < at + 16:
        return None
    return struct.unpack_from("<I", head, at + 12)[0]


def _validate(data: np.ndarray, sr: int, label: str) -> torch.Tensor:
    """data: (frames, channels) -> mono (frames,) tensor, or AudioError."""
    if data.size == 0:
        raise AudioError(f"{label}: no audio samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    if not np.isfinite(mono).all():
        raise AudioError(f"{label}: contains NaN or infinite samples")
    if mono.shape[0] < MIN_SECONDS * sr:
        raise AudioError(
            f"{label}: {mono.shape[0] / sr * 1000:.1f} ms is shorter than one "
            f"{MIN_SECONDS * 1000:.0f} ms frame"
        )
    if not mono.any():
        raise AudioError(f"{label}: silent (all samples are zero)")
    return torch.from_numpy(np.ascontiguousarray(mono))


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
