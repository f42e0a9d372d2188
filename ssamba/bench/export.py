"""Exported encoders vs eager: `torch.export` program and onnxruntime, at 10 s and 10 minutes.

The encoder is the 4 x 64 ssamba encoder the CPU recipes use, with the pretraining input
length (1,024 frames = 10.24 s); published sizes take far longer to export on a CPU
(docs/export.md). The exported files take one window length, so audio longer than a window
goes through them as `ssamba embed` feeds the eager encoder: windows of 1,024 frames,
`BATCH` at a time (the batch dimension is free). 10 s is one window, 10 minutes 59.
Times are medians of whole passes over the audio's windows (random normalised features:
the time does not depend on the values); the ratio is exported / eager, under 1 = faster.
`export_s` is the time to export and check the file.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ssamba.bench.report import median_seconds
from ssamba.export import export_program
from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile

FRAMES, BINS, BATCH = 1024, 128, 8
SECONDS = (10, 600)
FRAMES_PER_SECOND = 100


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per audio length: eager, exported-program and onnxruntime time and ratios."""
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("ssamba", "tiny", embed_dim=64, depth=4, input_frames=FRAMES)
    bundle = EncoderFile(AudioEncoder(cfg).eval(), FbankConfig(target_length=FRAMES))
    runners = {"eager": _eager(bundle.encoder)}
    export_s = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, name in (("exported-program", "encoder.pt2"), ("onnx", "encoder.onnx")):
            start = time.perf_counter()
            path, _ = export_program(bundle, Path(tmp) / name, fmt)
            export_s[fmt] = time.perf_counter() - start
            runners[fmt] = _program(path) if fmt == "exported-program" else _onnx(path)
        rows = []
        for seconds in SECONDS[:1] if quick else SECONDS:
            windows = math.ceil(seconds * FRAMES_PER_SECOND / FRAMES)
            fbank = torch.randn(windows, FRAMES, BINS)
            ms = {
                name: 1000
                * median_seconds(lambda r=runner, x=fbank: _passes(r, x), 1 if quick else 3)
                for name, runner in runners.items()
            }
            rows.append(
                {
                    "audio_s": seconds,
                    "windows": windows,
                    "eager_ms": ms["eager"],
                    "exported_ms": ms["exported-program"],
                    "exported_ratio": ms["exported-program"] / ms["eager"],
                    "onnx_ms": ms["onnx"],
                    "onnx_ratio": ms["onnx"] / ms["eager"],
                    "export_s": export_s["exported-program"],
                    "onnx_export_s": export_s["onnx"],
                    "threads": torch.get_num_threads(),
                }
            )
    return rows


def _passes(runner: Callable[[torch.Tensor], object], fbank: torch.Tensor) -> None:
    for begin in range(0, fbank.shape[0], BATCH):
        runner(fbank[begin : begin + BATCH])


def _eager(encoder: AudioEncoder) -> Callable[[torch.Tensor], None]:
    def call(fbank: torch.Tensor) -> None:
        with torch.inference_mode():
            encoder.pool(encoder.forward_features(fbank), "mean")

    return call


def _program(path: Path) -> Callable[[torch.Tensor], None]:
    module = torch.export.load(path).module()

    def call(fbank: torch.Tensor) -> None:
        with torch.inference_mode():
            module(fbank)

    return call


def _onnx(path: Path) -> Callable[[torch.Tensor], object]:
    import onnxruntime  # the export above already needed it

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda fbank: session.run(None, {name: fbank.numpy()})
