"""An X-ARES audio encoder (github.com/jimbozhang/xares) on any ssamba encoder file.

    from ssamba.xares import SsambaEncoder
    encoder = SsambaEncoder("encoder.pt")    # any file or folder `load_encoder_file` reads
    frames = encoder(waveforms)              # (batch, samples) at 16 kHz -> (batch, T', output_dim)

X-ARES's contract (`xares.audio_encoder_checker.check_audio_encoder`): a `torch.nn.Module`
whose class name ends in `Encoder`, with `output_dim`, `sampling_rate` and
`hop_size_in_ms`, mapping `(B, T)` waveforms to `(B, T', output_dim)` for inputs up to ten
minutes. Here T' counts the encoder's time patches (one every `hop_size_in_ms`: 160 ms for
16x16 patches), each the mean of its frequency patches, and only those centred on audio.

Any length in one call, memory linear in it: the waveform is cut into windows of the
encoder's input length (`ssamba.embed`), which go through the encoder `batch_size` at a
time, so the activations never exceed one batch of windows; only the (T', dim) outputs
grow with the input. The encoder is frozen (X-ARES trains only its probes), so the forward
runs without autograd.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from ssamba.embed import Embedder


class SsambaEncoder(nn.Module):
    """X-ARES's audio encoder: waveforms (B, T) at 16 kHz -> (B, T', output_dim)."""

    def __init__(self, path: str | Path, layer: int = -1, batch_size: int = 8) -> None:
        """path: an encoder file (or .ckpt, official .pth, adapter file, folder);
        layer: which layer's tokens (-1: the last); batch_size: windows per forward pass."""
        super().__init__()
        self.embedder = Embedder.from_file(path, batch_size=batch_size)
        self.layer = self.embedder.check_layer(layer)
        self.sampling_rate = self.embedder.sample_rate
        self.output_dim = self.embedder.step_dim("mean")
        windowing = self.embedder.windowing
        self.hop_size_in_ms = windowing.stride_frames * windowing.shift_ms

    def forward(self, audio: Tensor) -> Tensor:
        """audio: (B, T) or (T,) float at 16 kHz -> (B, T', output_dim) float32."""
        if audio.dim() == 1:
            audio = audio.unsqueeze(0)
        with torch.inference_mode():
            result = self.embedder.embed(audio.float(), [self.layer], "mean")
        return result.steps[0].float().clone()
