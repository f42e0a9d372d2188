"""Windows over a clip: which frames the encoder sees and which time steps are kept.

The encoder takes a fixed number of frames (`EncoderConfig.input_frames`, 1024 = 10.24 s
for the pretraining geometry), so audio of any length is cut into windows of at most that
length. One time step per time patch (every `stride` frames: 160 ms for 16x16 patches),
timestamped at the centre of the patch. By default windows follow each other without
overlap and the steps form one uniform grid; with a shorter hop every window contributes
only the steps around its centre, where the encoder saw context on both sides. Steps
whose centre lies past the end of the audio cover only padding and are dropped.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder


@dataclass(frozen=True)
class WindowPlan:
    """Which windows of a clip the encoder sees and which of their time steps are kept.

    starts: first frame of each window; steps: per window, the indices (long) of its time
    patches that enter the output; times_ms: (total_steps,) centre of every kept step,
    strictly increasing and inside the clip.
    """

    starts: list[int]
    steps: list[Tensor]
    times_ms: Tensor


@dataclass(frozen=True)
class Windowing:
    """Geometry of windows and time patches, in frames (one frame per `shift_ms`)."""

    patch_frames: int  # frames per time patch
    stride_frames: int  # frames between consecutive time patches
    grid_steps: int  # time patches per encoder input
    window_frames: int  # audio frames per window (<= the encoder's input_frames)
    hop_frames: int  # frames between window starts (a multiple of stride_frames)
    shift_ms: float
    length_ms: float
    sample_rate: int

    @classmethod
    def for_encoder(
        cls,
        encoder: AudioEncoder,
        fbank: FbankConfig,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
    ) -> Windowing:
        """Windows of the encoder's input length (or `window_seconds`, at most that), hop
        `hop_seconds` rounded to whole time patches (default: the window's tiled length,
        so the steps of all windows form one uniform grid)."""
        cfg = encoder.cfg
        frames_per_second = 1000 / fbank.frame_shift_ms
        window = cfg.input_frames
        if window_seconds is not None:
            window = round(window_seconds * frames_per_second)
            longest = cfg.input_frames / frames_per_second
            if not cfg.patch[1] <= window <= cfg.input_frames:
                raise ValueError(
                    f"window_seconds (--window-seconds) = {window_seconds}: must be between "
                    f"one patch ({cfg.patch[1] / frames_per_second:.2f} s) and the encoder's "
                    f"input length ({longest:.2f} s)"
                )
        geometry = cls(
            patch_frames=cfg.patch[1],
            stride_frames=cfg.stride[1],
            grid_steps=encoder.grid[1],
            window_frames=window,
            hop_frames=0,  # set below, once the tiled span of a window is known
            shift_ms=fbank.frame_shift_ms,
            length_ms=fbank.frame_length_ms,
            sample_rate=fbank.sample_rate,
        )
        span = geometry.span_frames
        hop = span
        if hop_seconds is not None:
            steps = round(hop_seconds * frames_per_second / geometry.stride_frames)
            hop = steps * geometry.stride_frames
            if steps < 1 or hop > span:
                raise ValueError(
                    f"hop_seconds (--hop-seconds) = {hop_seconds}: must be between one time "
                    f"patch ({geometry.stride_frames / frames_per_second:.2f} s) and the "
                    f"window's tiled length ({span / frames_per_second:.2f} s), or windows "
                    f"would leave gaps"
                )
        return replace(geometry, hop_frames=hop)

    @property
    def steps_per_window(self) -> int:
        """Time patches lying wholly inside one window of audio."""
        return min(
            self.grid_steps, 1 + (self.window_frames - self.patch_frames) // self.stride_frames
        )

    @property
    def span_frames(self) -> int:
        return self.steps_per_window * self.stride_frames

    @property
    def shift_samples(self) -> int:
        return round(self.sample_rate * self.shift_ms / 1000)

    @property
    def step_samples(self) -> int:
        """Samples between consecutive time steps."""
        return self.stride_frames * self.shift_samples

    def centre_ms(self, first_frame: Tensor) -> Tensor:
        """Centre time of time patches that start at `first_frame` (frames, any shape)."""
        middle = first_frame.double() + (self.patch_frames - 1) / 2
        return middle * self.shift_ms + self.length_ms / 2

    def window_samples(self, start_frame: int, num_samples: int) -> tuple[int, int]:
        """Sample range [begin, end) that yields the window's frames, clipped to the clip."""
        begin = start_frame * self.shift_samples
        length = (self.window_frames - 1) * self.shift_samples + round(
            self.sample_rate * self.length_ms / 1000
        )
        return begin, min(begin + length, num_samples)

    def plan(self, num_samples: int) -> WindowPlan:
        """Windows over a clip of `num_samples` and the time steps each contributes.

        Window w starts at frame w * hop and owns the steps that start in
        [start + offset, start + offset + hop), offset centring that range in the window;
        the first window also owns everything before, the last everything after. Steps
        centred past the end of the clip are dropped; at least one step is always kept
        (timestamped at the middle of a clip shorter than half a patch).
        """
        duration_ms = num_samples / self.sample_rate * 1000
        frame_samples = round(self.sample_rate * self.length_ms / 1000)
        num_frames = max(1, 1 + (num_samples - frame_samples) // self.shift_samples)
        hop = self.hop_frames
        count = 1 + max(0, math.ceil((num_frames - self.window_frames) / hop))
        offset = (self.span_frames - hop) // 2 // self.stride_frames * self.stride_frames
        index = torch.arange(self.grid_steps)
        # a window shorter than the encoder input is padded: keep patches centred on audio
        inside_window = (
            index * self.stride_frames + (self.patch_frames - 1) / 2 < self.window_frames
        )
        starts, steps, times = [], [], []
        for w in range(count):
            start = w * hop
            first = start + index * self.stride_frames
            centre = self.centre_ms(first)
            keep = (centre < duration_ms) & inside_window
            if w > 0:
                keep &= first >= start + offset
            if w < count - 1:
                keep &= first < start + offset + hop
            starts.append(start)
            steps.append(index[keep])
            times.append(centre[keep])
        if not any(len(s) for s in steps):
            steps[0] = index[:1]
            times[0] = torch.tensor([duration_ms / 2], dtype=torch.float64)
        return WindowPlan(starts, steps, torch.cat(times).float())
