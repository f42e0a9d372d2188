"""Encoders: the Mamba mixer, the ViT block, AudioEncoder, encoder files and official checkpoints.

from ssamba.models import AudioEncoder, EncoderConfig, load_encoder_file
encoder = AudioEncoder(EncoderConfig(family="ssamba", embed_dim=192, input_frames=1024))
bundle = load_encoder_file("encoder.pt")      # or a Lightning .ckpt, or an official .pth
"""

from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError, load_official, to_official

__all__ = [
    "AudioEncoder",
    "CheckpointError",
    "EncoderConfig",
    "EncoderFile",
    "load_encoder_file",
    "load_official",
    "to_official",
]
