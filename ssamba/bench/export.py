"""Exported encoders vs eager: `torch.export` program and onnxruntime, at 10 s and 10 minutes.

Two encoders: the 4 x 64 ssamba encoder the CPU recipes use and, without `--quick`,
SSAMBA-tiny (24 x 192), both with the pretraining input length (1,024 frames = 10.24 s
windows). Each is exported in both formats in a fresh process (`export_s`, and
`export_peak_mb`, that process's peak resident memory), and once more as a program that
keeps ssamba's fused C++ mixer (`--keep-kernels`: `kernels_*`). The exported files take a clip of
any length, so every runner gets the whole clip's features in one call, (1, frames, 128):
eager is `ssamba.export.ClipEmbedder` (what the files hold, run by ssamba with its C++
kernels), the others the files. 10 s is one window, 10 minutes 59 windows in one batch.
Times are medians (random normalised features: the time does not depend on the values);
ratios are exported / eager, under 1 = faster; `*_max_diff` the largest difference of a
file's outputs (embedding and steps) from eager's on the same input.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ssamba.bench.report import in_fresh_process, median_seconds, peak_rss_bytes
from ssamba.export import ClipEmbedder, export_program, max_abs_diff, onnx_runner
from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file

FRAMES, BINS = 1024, 128
SECONDS = (10, 600)
FRAMES_PER_SECOND = 100
MODELS = {"ssamba 4x64": {"embed_dim": 64, "depth": 4}, "ssamba-tiny": {}}
# runner -> (file name, format, keep_kernels)
EXPORTS = {
    "exported-program": ("encoder.pt2", "exported-program", False),
    "onnx": ("encoder.onnx", "onnx", False),
    "kernels": ("encoder-kernels.pt2", "exported-program", True),
}


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per encoder and audio length: eager, program and onnxruntime times, ratios."""
    rows = []
    for model, sizes in list(MODELS.items())[: 1 if quick else None]:
        with tempfile.TemporaryDirectory() as tmp:
            source = _encoder_file(Path(tmp), sizes)
            exports = {
                runner: in_fresh_process(_export, str(source), str(Path(tmp) / name), fmt, keep)
                for runner, (name, fmt, keep) in EXPORTS.items()
            }
            bundle = load_encoder_file(source)
            runners = {
                "eager": ClipEmbedder(bundle.encoder.eval(), bundle.features).eval(),
                "exported-program": torch.export.load(exports["exported-program"]["path"]).module(),
                "onnx": onnx_runner(Path(exports["onnx"]["path"])),
                "kernels": torch.export.load(exports["kernels"]["path"]).module(),
            }
            for seconds in SECONDS[:1] if quick else SECONDS:
                fbank = torch.randn(1, seconds * FRAMES_PER_SECOND, BINS)
                repeats = 1 if quick or seconds > 60 else 3
                # the outputs compared below are each runner's warm-up call
                with torch.inference_mode():
                    outputs = {name: runner(fbank) for name, runner in runners.items()}
                ms = {
                    name: 1000
                    * median_seconds(lambda r=runner, x=fbank: _no_grad(r, x), repeats, warmup=0)
                    for name, runner in runners.items()
                }
                rows.append(
                    {
                        "model": model,
                        "audio_s": seconds,
                        "windows": -(-fbank.shape[1] // FRAMES),
                        "eager_ms": ms["eager"],
                        "exported_ms": ms["exported-program"],
                        "exported_ratio": ms["exported-program"] / ms["eager"],
                        "onnx_ms": ms["onnx"],
                        "onnx_ratio": ms["onnx"] / ms["eager"],
                        "exported_max_diff": max_abs_diff(
                            outputs["eager"], outputs["exported-program"]
                        ),
                        "onnx_max_diff": max_abs_diff(outputs["eager"], outputs["onnx"]),
                        "kernels_ms": ms["kernels"],
                        "kernels_ratio": ms["kernels"] / ms["eager"],
                        "kernels_max_diff": max_abs_diff(outputs["eager"], outputs["kernels"]),
                        "export_s": exports["exported-program"]["seconds"],
                        "export_peak_mb": exports["exported-program"]["peak_mb"],
                        "onnx_export_s": exports["onnx"]["seconds"],
                        "onnx_export_peak_mb": exports["onnx"]["peak_mb"],
                        "kernels_export_s": exports["kernels"]["seconds"],
                        "threads": torch.get_num_threads(),
                    }
                )
    return rows


def _encoder_file(folder: Path, sizes: dict[str, int]) -> Path:
    torch.manual_seed(0)
    cfg = EncoderConfig.preset("ssamba", "tiny", input_frames=FRAMES, **sizes)
    bundle = EncoderFile(AudioEncoder(cfg).eval(), FbankConfig(target_length=FRAMES))
    return bundle.save(folder / "encoder.pt")


def _export(source: str, out: str, fmt: str, keep_kernels: bool) -> dict:
    """Export in this (fresh) process: its time and the process's peak memory."""
    start = time.perf_counter()
    path, _ = export_program(load_encoder_file(source), Path(out), fmt, keep_kernels)
    seconds = time.perf_counter() - start
    return {"path": str(path), "seconds": seconds, "peak_mb": peak_rss_bytes() / 2**20}


def _no_grad(runner: Callable[[torch.Tensor], object], fbank: torch.Tensor) -> None:
    with torch.inference_mode():
        runner(fbank)
