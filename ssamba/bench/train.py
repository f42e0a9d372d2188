"""Pretraining speed: MSPM steps per second, SSAMBA-tiny vs SSAST-tiny, on this machine.

One step is what `ssamba pretrain` runs per batch, minus data loading: the joint
objective of the originals (cluster masks, 400 of 512 patches masked, InfoNCE + 10 x MSE
from two forward passes with independent masks), backward, AdamW update. Input: batch 8
of 1024-frame, 128-bin filterbanks (random values, as the model cost does not depend on
them) cut into 16 x 16 patches with stride 16: 8 x 64 = 512 tokens, the pretraining
geometry. Models:

- ssamba-tiny: 24 bidirectional Mamba v2 layers, D=192 (the fused CPU mixer, which
  recomputes in_proj's output in its backward instead of keeping it);
- ssast-tiny-sdpa: DeiT-tiny, 12 blocks, D=192, attention with torch's SDPA;
- ssast-tiny-naive: the same with the original SSAST's explicit L x L attention;
- *-bf16: the step under `torch.autocast("cpu", torch.bfloat16)` (the recipes train in
  float32; this shows what bf16 would give on this CPU).

Each model runs in a fresh process (one warm-up step, then the median of the timed
steps). `vs_ssast` is ssast-tiny-sdpa's step time (in the row's precision) over the
row's: above 1 is faster than SSAST. `peak_mb` is the growth of the resident set during the steps (activations,
gradients, optimizer state, allocator slack). The machine's 1-minute load average is
recorded next to each row, since other jobs on a shared machine slow every number.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ssamba.bench.report import in_fresh_process, peak_rss_bytes, rss_bytes

BATCH, FRAMES, N_MASKED = 8, 1024, 400
# name -> (family, EncoderConfig overrides, autocast to bf16)
MODELS = {
    "ssamba-tiny": ("ssamba", {}, False),
    "ssast-tiny-sdpa": ("ssast", {"attention": "sdpa"}, False),
    "ssast-tiny-naive": ("ssast", {"attention": "naive"}, False),
    "ssamba-tiny-bf16": ("ssamba", {}, True),
    "ssast-tiny-sdpa-bf16": ("ssast", {"attention": "sdpa"}, True),
}
REFERENCE = {False: "ssast-tiny-sdpa", True: "ssast-tiny-sdpa-bf16"}  # per precision


def run(out_dir: Path, quick: bool) -> list[dict]:
    """One row per model; `quick` times 2 steps instead of 5."""
    steps = 2 if quick else 5
    # A fresh process per model: one model's memory and allocator state stay its own.
    rows = [in_fresh_process(_measure, model, steps) for model in MODELS]
    seconds = {r["model"]: r["s_per_step"] for r in rows}
    for row in rows:
        row["vs_ssast"] = seconds[REFERENCE[row["bf16"]]] / row["s_per_step"]
    return rows


def _measure(model: str, steps: int) -> dict:
    """Build the task and its optimizer, then time full training steps; runs in a child."""
    from ssamba.cli import sleeping_openmp_threads

    sleeping_openmp_threads()  # as `ssamba pretrain` runs (before torch is imported)
    import torch

    from ssamba.models.encoder import EncoderConfig
    from ssamba.models.scan import resolve_implementation
    from ssamba.tasks.pretrain import MSPMConfig, PretrainTask, ScheduleConfig

    torch.manual_seed(0)
    family, overrides, bf16 = MODELS[model]
    task = PretrainTask(
        EncoderConfig.preset(family, "tiny", **overrides),
        input_frames=FRAMES,
        objective=MSPMConfig(n_masked=N_MASKED),
        schedule=ScheduleConfig(warmup_steps=0),
    )
    task.train()
    optimizer = task.configure_optimizers()
    fbank = torch.randn(BATCH, FRAMES, task.encoder.cfg.num_mel_bins)
    masks = torch.Generator().manual_seed(0)
    baseline = rss_bytes()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = task.mspm(fbank, N_MASKED, masks).loss
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernel load, allocator growth
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    return {
        "model": model,
        "tokens": task.encoder.num_patches,
        "batch": BATCH,
        "n_masked": N_MASKED,
        "bf16": bf16,
        "params_m": sum(p.numel() for p in task.parameters()) / 1e6,
        "s_per_step": median,
        "steps_per_s": 1 / median,
        "vs_ssast": None,
        "peak_mb": (peak_rss_bytes() - baseline) / 2**20,
        "threads": torch.get_num_threads(),
        "scan": resolve_implementation(torch.device("cpu")) if family != "ssast" else "",
        "omp_wait": os.environ["OMP_WAIT_POLICY"],
        "load_avg": os.getloadavg()[0],
    }
