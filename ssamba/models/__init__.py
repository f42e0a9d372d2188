"""Encoders: the Mamba mixer, the ViT block, AudioEncoder and checkpoint import/export.

from ssamba.models import AudioEncoder, EncoderConfig
encoder = AudioEncoder(EncoderConfig.preset("ssamba", "tiny", input_frames=1024))
"""

from ssamba.models.checkpoints import load_encoder, load_official, save_encoder, to_official
from ssamba.models.encoder import AudioEncoder, EncoderConfig

__all__ = [
    "AudioEncoder",
    "EncoderConfig",
    "load_encoder",
    "load_official",
    "save_encoder",
    "to_official",
]
