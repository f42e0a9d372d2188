"""Mixers and whole encoders vs sequence length: where Mamba overtakes attention.

Two sweeps, every configuration measured in a fresh process so one run's memory cannot
hide in another's numbers:

- mixer: forward + backward of one token mixer at d=192, batch 4: the bidirectional
  Mamba v2 mixer (on CPU the fused path of `ssamba.models.fused`; "-composed" is the
  unfused reference path, `use_fast_path=False`), the attention mixer (qkv Linear,
  attention, proj Linear) with SDPA and with the naive (L x L) attention of the original
  SSAST;
- encoder: inference of ssamba-tiny vs ssast-tiny (fp32, no_grad, mean pooling, batch 4,
  16x16 patches with stride 16, so tokens = frames / 2), as SSAMBA's efficiency figure
  (`src/inference/inference_amba.py`), with SSAST both with the original naive attention
  and with SDPA (`python -m ssamba.bench efficiency` goes to 32k tokens).

Time is the median wall time (CUDA-synchronised on GPU). Memory is the peak above what
the process held before the first call: resident set size on CPU (so it includes
allocator slack), `max_memory_allocated` on CUDA.
"""

from __future__ import annotations

import time
from pathlib import Path

from ssamba.bench.report import in_fresh_process, peak_rss_bytes, rss_bytes

MIXER_TOKENS = [256, 512, 1024, 2048, 4096]
ENCODER_TOKENS = [512, 1024, 2048, 4096]
QUICK_LIMIT = 1024
DIM, BATCH, HEADS = 192, 4, 3
MIXERS = ("mamba-v2", "mamba-v2-composed", "attention-sdpa", "attention-naive")
# name -> (family, EncoderConfig overrides); the original SSAST computed attention naively.
ENCODERS = {
    "ssamba-tiny": ("ssamba", {}),
    "ssast-tiny-naive": ("ssast", {"attention": "naive"}),
    "ssast-tiny-sdpa": ("ssast", {"attention": "sdpa"}),
}


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per (sweep, model, tokens); `quick` stops at 1024 tokens with fewer repeats."""
    repeats = 3 if quick else 5
    jobs = [("mixer", model, tokens) for tokens in _limit(MIXER_TOKENS, quick) for model in MIXERS]
    jobs += [
        ("encoder", model, tokens) for tokens in _limit(ENCODER_TOKENS, quick) for model in ENCODERS
    ]
    # A fresh process per measurement: peak memory of one cannot leak into the next.
    return [
        in_fresh_process(_measure, sweep, model, tokens, repeats) for sweep, model, tokens in jobs
    ]


def _limit(tokens: list[int], quick: bool) -> list[int]:
    return [t for t in tokens if t <= QUICK_LIMIT] if quick else tokens


def _measure(sweep: str, model: str, tokens: int, repeats: int) -> dict:
    """Build the workload, then time it and record its peak memory; runs in a child process."""
    import torch

    from ssamba.models.scan import resolve_implementation

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    step = (
        _mixer_step(model, tokens, device)
        if sweep == "mixer"
        else _encoder_step(model, tokens, device)
    )
    baseline = _memory_now(device)
    step()  # warm-up: kernel builds, allocator growth
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "sweep": sweep,
        "model": model,
        "tokens": tokens,
        "batch": BATCH,
        "ms": 1000 * times[len(times) // 2],
        "peak_mb": (_peak_memory(device) - baseline) / 2**20,
        "device": device.type,
        "threads": torch.get_num_threads(),
        "scan": resolve_implementation(device) if "mamba" in model or "ssamba" in model else "",
    }


def _mixer_step(model: str, tokens: int, device):
    """forward + backward of one mixer on (batch, tokens, 192)."""
    import torch

    from ssamba.models.mamba import MambaMixer
    from ssamba.models.transformer import Attention

    if model.startswith("mamba-v2"):
        mixer = MambaMixer(DIM, bimamba="v2", use_fast_path=model == "mamba-v2")
    else:
        mixer = Attention(DIM, HEADS, impl=model.removeprefix("attention-"))
    mixer = mixer.to(device)
    x = torch.randn(BATCH, tokens, DIM, device=device, requires_grad=True)

    def step() -> None:
        mixer(x).sum().backward()

    return step


def _encoder_step(model: str, tokens: int, device):
    """Inference of a tiny encoder on (batch, 2 * tokens frames, 128 mel bins)."""
    import torch

    from ssamba.models.encoder import AudioEncoder, EncoderConfig

    family, overrides = ENCODERS[model]
    cfg = EncoderConfig.preset(family, "tiny", input_frames=2 * tokens, **overrides)
    encoder = AudioEncoder(cfg).to(device).eval()
    fbank = torch.randn(BATCH, cfg.input_frames, cfg.num_mel_bins, device=device)

    def step() -> None:
        with torch.no_grad():
            encoder(fbank, pool="mean")

    return step


def _memory_now(device) -> int:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return rss_bytes()


def _peak_memory(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return peak_rss_bytes()
