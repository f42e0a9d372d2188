"""Learning-rate schedules of every task: one multiplier of the base rate per optimizer step.

The rate of a step is a pure function of (step, epoch, plateau state), and the tasks save
the plateau state in their checkpoints, so a resumed run continues with exactly the rate
it would have had; no torch scheduler state can drift. A task sets each optimizer
group's `lr = base_lr * lr_factor(...)` before the step (`apply_lr`).

    factor = warm-up(step) * decay(step, epoch)

Warm-up over `warmup_steps`: "linear" multiplies by (step + 1) / warmup_steps;
"staircase" is the originals' (docs/originals.md#optimisation): the rate is updated every
50 steps to step / warmup_steps, so it is exactly 0 for the first 50 steps.
Decay after (and during) warm-up:
- "constant": 1;
- "multistep": the originals' fine-tuning MultiStepLR, stepped once per epoch with
  milestones range(decay_start, 1000, decay_every): during epoch e the factor is
  gamma ** #(milestones <= e);
- "cosine": from 1 down to `min_factor` over the steps after warm-up;
- "plateau": `PlateauScale.scale`, halved when the monitored metric stops improving
  (the originals' pretraining ReduceLROnPlateau).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

Schedule = Literal["constant", "multistep", "cosine", "plateau"]
Warmup = Literal["linear", "staircase"]
STAIRCASE_EVERY = 50  # the originals update the warm-up rate every 50 steps


@dataclass
class PlateauScale:
    """The multiplier of ReduceLROnPlateau(mode="max"), kept as plain (checkpointable) state.

    Same rule as torch's: an evaluation improves when it beats the best by a relative
    `threshold`; after more than `patience` evaluations without improvement the scale is
    multiplied by `factor`.
    """

    factor: float = 0.5
    patience: int = 2
    threshold: float = 1e-4
    scale: float = 1.0
    best: float = -math.inf
    bad_evals: int = 0

    def step(self, metric: float) -> None:
        if metric > self.best * (1 + self.threshold) if self.best > 0 else metric > self.best:
            self.best, self.bad_evals = metric, 0
            return
        self.bad_evals += 1
        if self.bad_evals > self.patience:
            self.scale *= self.factor
            self.bad_evals = 0


def warmup_factor(step: int, warmup_steps: int, shape: Warmup = "linear") -> float:
    """Warm-up multiplier before optimizer step `step` (0-based)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    if shape == "staircase":
        return (step // STAIRCASE_EVERY) * STAIRCASE_EVERY / warmup_steps
    if shape == "linear":
        return (step + 1) / warmup_steps
    raise ValueError(f"warmup: {shape!r} is not linear|staircase")


def lr_factor(
    step: int,
    epoch: int,
    *,
    schedule: Schedule,
    warmup_steps: int = 0,
    warmup: Warmup = "linear",
    decay_start: int = 5,
    decay_every: int = 1,
    decay_gamma: float = 0.85,
    total_steps: float = math.inf,
    min_factor: float = 0.0,
    plateau: PlateauScale | None = None,
) -> float:
    """Multiplier of the base learning rate before optimizer step `step` in epoch `epoch`.

    Both counters are 0-based; `total_steps` is the run's length (cosine only), `plateau`
    the plateau state (plateau only). See the module docstring for each schedule.
    """
    warm = warmup_factor(step, warmup_steps, warmup)
    if schedule == "constant":
        return warm
    if schedule == "multistep":
        passed = 0 if epoch < decay_start else (epoch - decay_start) // decay_every + 1
        return warm * decay_gamma**passed
    if schedule == "plateau":
        if plateau is None:
            raise ValueError("schedule plateau needs the plateau state")
        return warm * plateau.scale
    if schedule == "cosine":
        if not math.isfinite(total_steps):
            raise ValueError(
                "schedule cosine needs a known number of steps "
                "(set trainer.max_steps, or trainer.max_epochs with a sized train loader)"
            )
        span = max(1.0, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, (step - warmup_steps) / span))
        return warm * (min_factor + (1 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
    raise ValueError(f"schedule: {schedule!r} is not constant|multistep|cosine|plateau")


def apply_lr(optimizers: list[torch.optim.Optimizer], factor: float) -> None:
    """Set every group's rate to its `base_lr` (set when the optimizer is built) x factor."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
