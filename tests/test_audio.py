"""load_audio: real clips decode to mono 16 kHz float32; every kind of bad clip is named."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import torchaudio

from ssamba.audio import AUDIO_EXTENSIONS, AudioError, load_audio


def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def test_fsdd_clip_is_upsampled_from_8k_to_16k(fsdd_dir: Path) -> None:
    path = fsdd_dir / "recordings" / "3_jackson_0.wav"
    native, native_sr = sf.read(path, dtype="float32")
    wave, sr = load_audio(path)
    assert native_sr == 8000 and sr == 16000
    assert wave.dtype == torch.float32 and wave.dim() == 1
    assert wave.numel() == 2 * native.shape[0]
    expected = torchaudio.functional.resample(torch.from_numpy(native), 8000, 16000)
    torch.testing.assert_close(wave, expected)


def test_16k_recording_is_returned_unchanged(sample_wav: Path) -> None:
    native, _ = sf.read(sample_wav, dtype="float32")
    wave, sr = load_audio(sample_wav)
    assert sr == 16000
    torch.testing.assert_close(wave, torch.from_numpy(native))


def test_bytes_decode_like_the_file(sample_wav: Path) -> None:
    from_bytes, _ = load_audio(sample_wav.read_bytes())
    from_path, _ = load_audio(sample_wav)
    torch.testing.assert_close(from_bytes, from_path)


def test_stereo_44k_is_downmixed_by_channel_mean_then_resampled(tmp_path: Path) -> None:
    left = _tone(0.5, 44100)
    stereo = np.stack([left, 0.5 * left], axis=1)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    wave, sr = load_audio(path)
    expected = torchaudio.functional.resample(torch.from_numpy(0.75 * left), 44100, 16000)
    assert sr == 16000
    torch.testing.assert_close(wave, expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("fmt", "subtype", "tolerance"),
    [
        ("wav", "PCM_24", 1e-6),
        ("wav", "ULAW", 0.02),
        ("wav", "PCM_U8", 0.01),
        ("flac", "PCM_16", 1e-4),
        ("ogg", "VORBIS", 0.05),
        ("mp3", "MPEG_LAYER_III", None),
    ],
)
def test_common_encodings_decode_to_the_signal(
    tmp_path: Path, fmt: str, subtype: str, tolerance: float | None
) -> None:
    signal = _tone(0.5, 16000)
    path = tmp_path / f"clip.{fmt}"
    sf.write(path, signal, 16000, subtype=subtype)
    wave, _ = load_audio(path)
    if tolerance is None:  # mp3 adds encoder delay: compare energy, not samples
        assert abs(wave.pow(2).mean().sqrt().item() - 0.3 / np.sqrt(2)) < 0.03
    else:
        assert wave.numel() == signal.size
        assert (wave - torch.from_numpy(signal)).abs().max().item() < tolerance


def _write_bad(tmp_path: Path, kind: str) -> Path:
    """A clip broken in one specific way."""
    path = tmp_path / f"{kind}.wav"
    good = _tone(0.5, 16000)
    if kind == "empty_file":
        path.write_bytes(b"")
    elif kind == "no_samples":
        sf.write(path, good[:0], 16000)
    elif kind == "nan":
        bad = good.copy()
        bad[100] = np.nan
        sf.write(path, bad, 16000, subtype="FLOAT")
    elif kind == "inf":
        bad = good.copy()
        bad[7] = np.inf
        sf.write(path, bad, 16000, subtype="FLOAT")
    elif kind == "silent":
        sf.write(path, np.zeros_like(good), 16000)
    elif kind == "too_short":
        sf.write(path, good[:300], 16000)  # 18.75 ms < one 25 ms frame
    elif kind == "not_audio":
        path.write_bytes(b"this is a text file, not audio\n" * 40)
    elif kind == "truncated_wav":
        sf.write(path, good, 16000)
        path.write_bytes(path.read_bytes()[:4000])
    elif kind == "truncated_flac":
        path = tmp_path / "truncated_flac.flac"
        sf.write(path, np.tile(good, 4), 16000)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "rate_zero":
        sf.write(path, good, 16000)
        data = bytearray(path.read_bytes())
        at = data.find(b"fmt ")
        struct.pack_into("<I", data, at + 12, 0)
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("empty_file", "empty"),
        ("no_samples", "no audio samples"),
        ("nan", "NaN or infinite"),
        ("inf", "NaN or infinite"),
        ("silent", "silent"),
        ("too_short", "shorter than one 25 ms frame"),
        ("not_audio", "cannot decode"),
        ("truncated_wav", "truncated"),
        ("truncated_flac", "cannot decode"),
        ("rate_zero", "sample rate 0"),
    ],
)
def test_bad_clip_raises_audio_error_naming_file_and_problem(
    tmp_path: Path, kind: str, reason: str
) -> None:
    path = _write_bad(tmp_path, kind)
    with pytest.raises(AudioError) as info:
        load_audio(path)
    assert str(path) in str(info.value)
    assert reason in str(info.value)
    with pytest.raises(AudioError, match=reason):  # same verdict from bytes, with the given name
        load_audio(path.read_bytes(), name="clip-42")


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(AudioError, match=r"nowhere\.flac: file not found"):
        load_audio(tmp_path / "nowhere.flac")


def test_audio_error_is_a_value_error() -> None:
    # callers that only know ValueError (argument checking) still catch bad clips
    assert issubclass(AudioError, ValueError)


# Extensions whose container soundfile cannot infer from the name alone.
WRITE_AS = {
    ".wave": ("WAV", None),
    ".aif": ("AIFF", None),
    ".aifc": ("AIFF", None),
    ".snd": ("AU", None),
    ".oga": ("OGG", None),
    ".opus": ("OGG", "OPUS"),
    ".mp3": ("MP3", None),
}


def test_every_listed_extension_decodes(tmp_path: Path) -> None:
    assert {".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au"} <= AUDIO_EXTENSIONS
    for ext in sorted(AUDIO_EXTENSIONS):
        assert ext.startswith(".") and ext == ext.lower()
        fmt, subtype = WRITE_AS.get(ext, (None, None))
        path = tmp_path / f"clip{ext}"
        sf.write(path, _tone(0.5, 16000), 16000, format=fmt, subtype=subtype)
        wave, sr = load_audio(path)
        assert sr == 16000 and abs(wave.numel() - 8000) < 800, ext
