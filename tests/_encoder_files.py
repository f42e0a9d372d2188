"""Small encoder files for the tests of `ssamba embed`, HEAR and s3prl (no pretrained weights)."""

from __future__ import annotations

from pathlib import Path

import torch

from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile

# 2.56 s windows of 16 x 16 patches: 8 x 16 grid, 2 block pairs of width 32.
INPUT_FRAMES = 256


def write_small_encoder(
    path: Path, family: str = "ssamba", seed: int = 0, features: FbankConfig | None = None
) -> Path:
    """A randomly initialised encoder file with its feature settings, as pretraining writes it."""
    torch.manual_seed(seed)
    depth = 2 if family == "ssast" else 4
    cfg = EncoderConfig.preset(
        family, "tiny", embed_dim=32, depth=depth, input_frames=INPUT_FRAMES, num_heads=2
    )
    features = features or FbankConfig(target_length=INPUT_FRAMES)
    return EncoderFile(AudioEncoder(cfg), features, provenance={"kind": "test"}).save(path)
