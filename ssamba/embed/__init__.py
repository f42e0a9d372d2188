"""Embeddings from an encoder file: the core that `ssamba embed`, HEAR and s3prl share.

windows.py   Windowing, WindowPlan: which frames of a clip each window covers and
             which time steps are kept (one per time patch, centred timestamps)
embedder.py  Embedder, Embeddings: waveforms in, embeddings out, built from an
             `EncoderFile` with the features its encoder was trained on
cli.py       `ssamba embed`: files and folders in, .npy files out

Usage:

from ssamba.embed import Embedder
embedder = Embedder.from_file("encoder.pt")        # or a .ckpt, or an official .pth
with torch.inference_mode():
    result = embedder.embed(waves)                 # waves: (clips, samples) at 16 kHz
result.pooled(0, "mean")                           # (clips, width)
"""

from ssamba.embed.embedder import (
    Embedder,
    Embeddings,
    FreqMode,
    PoolMode,
    check_waves,
    time_steps,
    trained_features,
)
from ssamba.embed.windows import Windowing, WindowPlan

__all__ = [
    "Embedder",
    "Embeddings",
    "FreqMode",
    "PoolMode",
    "WindowPlan",
    "Windowing",
    "check_waves",
    "time_steps",
    "trained_features",
]
