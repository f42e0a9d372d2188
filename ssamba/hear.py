"""The HEAR 2021 API (hearbenchmark.com) for ssamba encoders.

    model = ssamba.hear.load_model("encoder.pt")
    scene = get_scene_embeddings(audio, model)                 # (n, scene_embedding_size)
    emb, times = get_timestamp_embeddings(audio, model)        # (n, steps, size), (n, steps) ms

audio: (n, samples) float at 16 kHz, all clips the same length (HEAR pads them), n >= 1,
samples >= 1, every sample finite: anything else is a ValueError (naming the clip with a
NaN or infinite sample) rather than a NaN embedding.

Time resolution is the patch grid's: one timestamp per time patch (every 160 ms for 16x16
patches, 100 ms with stride 10), at the centre of the patch, only where the clip has audio.
A timestamp embedding concatenates the frequency patches of its time step (`freq="concat"`,
size = frequency patches x width, as SSAST's SUPERB upstream did), so the downstream probe
still sees which band a pattern sits in; `freq="mean"` averages them (size = width).
The scene embedding is the mean of all real patch tokens (SSAMBA's `ft_avgtok`), size = width.
Clips longer than the encoder's input are cut into windows (see `ssamba.embed`).
Filterbanks use the feature settings stored in the model file (`load_encoder_file`), so an
encoder pretrained on another corpus is fed that corpus's normalisation.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from ssamba.embed import Embedder, FreqMode
from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile


class HearModel(nn.Module):
    """An `Embedder` with the attributes HEAR reads and the choices HEAR leaves to the model."""

    def __init__(self, embedder: Embedder, layer: int = -1, freq: FreqMode = "concat") -> None:
        super().__init__()
        embedder.check_layer(layer)
        self.embedder = embedder
        self.layer = layer
        self.freq = freq
        self.sample_rate = embedder.sample_rate
        self.scene_embedding_size = embedder.embed_dim
        self.timestamp_embedding_size = embedder.step_dim(freq)


def load_model(
    model_file_path: str = "",
    layer: int = -1,
    freq: FreqMode = "concat",
    window_seconds: float | None = None,
    hop_seconds: float | None = None,
    batch_size: int = 8,
) -> HearModel:
    """Load an encoder file, a Lightning .ckpt of ssamba's tasks or an official
    SSAMBA/SSAST/AuM checkpoint as a HEAR model (`load_encoder_file`: files holding pickled
    code are refused with a one-line CheckpointError, a missing one is FileNotFoundError).

    An empty path gives a randomly initialised ssamba-tiny: a baseline that shows what
    the architecture alone contributes. `layer`: which layer's tokens (-1: the last);
    the other keywords are those of `ssamba.embed.Embedder`.
    """
    options = dict(window_seconds=window_seconds, hop_seconds=hop_seconds, batch_size=batch_size)
    if model_file_path:
        embedder = Embedder.from_file(model_file_path, **options)
    else:
        warnings.warn(
            "ssamba.hear.load_model: no model file given, using a randomly initialised "
            "ssamba-tiny (a baseline, not a trained model)",
            stacklevel=2,
        )
        encoder = AudioEncoder(EncoderConfig.preset("ssamba", "tiny"))
        bundle = EncoderFile(encoder, FbankConfig(), provenance={"kind": "random initialisation"})
        embedder = Embedder(bundle, **options)
    return HearModel(embedder, layer=layer, freq=freq)


def get_scene_embeddings(audio: Tensor, model: HearModel) -> Tensor:
    """audio: (n, samples) at 16 kHz -> (n, scene_embedding_size) float32."""
    with torch.inference_mode():
        result = model.embedder.embed(audio, [model.layer], "mean")
        return result.pooled(0, "mean").float()


def get_timestamp_embeddings(audio: Tensor, model: HearModel) -> tuple[Tensor, Tensor]:
    """audio: (n, samples) at 16 kHz -> embeddings (n, steps, timestamp_embedding_size)
    float32 and timestamps (n, steps) float32 in milliseconds, increasing, inside the clip."""
    with torch.inference_mode():
        result = model.embedder.embed(audio, [model.layer], model.freq)
        embeddings = result.steps[0].float()
    times = result.times_ms.to(embeddings.device).expand(embeddings.shape[0], -1)
    return embeddings, times.contiguous()
