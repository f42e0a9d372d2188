"""The HEAR 2021 API (hearbenchmark.com) for ssamba encoders.

    model = ssamba.hear.load_model("encoder.pt")
    scene = get_scene_embeddings(audio, model)                 # (n, scene_embedding_size)
    emb, times = get_timestamp_embeddings(audio, model)        # (n, steps, size), (n, steps) ms

audio: (n, samples) at 16 kHz, a torch tensor or a numpy array, all clips the same length
(HEAR pads them), n >= 1, samples >= 1, every sample finite: anything else is a ValueError
(naming the clip with a NaN or infinite sample) rather than a NaN embedding. Float samples
are taken as they are; int16 (and other integer) samples are scaled to [-1, 1) (int16 by
1/32768), as torchaudio and soundfile read them.

Timestamp embeddings come every `timestamp_hop_ms` (default 40; HEAR scores onsets and
notes at 50 ms, so it asks for 50 ms or less). The encoder's own time resolution is its
patch grid (one step per time patch: every 160 ms for 16x16 patches, 100 ms with stride
10), so the clip is encoded once more for each further offset of `timestamp_hop_ms` within
one patch step (the audio shifted by whole frames; 4 passes for 160 ms) and the steps of all
passes are merged in time order: every timestamp is the centre of a patch the encoder
really saw, not an interpolation. `timestamp_hop_ms=None` gives the patch grid alone (one
pass). Offsets where less than one patch of audio is left add nothing.
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

import numpy as np
import torch
from torch import Tensor, nn

from ssamba.embed import Embedder, FreqMode
from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile

TIMESTAMP_HOP_MS = 40.0


class HearModel(nn.Module):
    """An `Embedder` with the attributes HEAR reads and the choices HEAR leaves to the model."""

    def __init__(
        self,
        embedder: Embedder,
        layer: int = -1,
        freq: FreqMode = "concat",
        timestamp_hop_ms: float | None = TIMESTAMP_HOP_MS,
    ) -> None:
        super().__init__()
        embedder.check_layer(layer)
        windowing = embedder.windowing
        if timestamp_hop_ms is not None and not windowing.shift_ms <= timestamp_hop_ms:
            raise ValueError(
                f"timestamp_hop_ms = {timestamp_hop_ms}: must be at least one frame "
                f"({windowing.shift_ms:g} ms), or None for the patch grid"
            )
        self.embedder = embedder
        self.layer = layer
        self.freq = freq
        self.timestamp_hop_ms = timestamp_hop_ms
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
    timestamp_hop_ms: float | None = TIMESTAMP_HOP_MS,
) -> HearModel:
    """Load an encoder file, a Lightning .ckpt of ssamba's tasks or an official
    SSAMBA/SSAST/AuM checkpoint as a HEAR model (`load_encoder_file`: files holding pickled
    code are refused with a one-line CheckpointError, a missing one is FileNotFoundError).

    An empty path gives a randomly initialised ssamba-tiny: a baseline that shows what
    the architecture alone contributes. `layer`: which layer's tokens (-1: the last);
    `timestamp_hop_ms`: see the module docstring; the other keywords are those of
    `ssamba.embed.Embedder`.
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
    return HearModel(embedder, layer=layer, freq=freq, timestamp_hop_ms=timestamp_hop_ms)


def as_waves(audio: Tensor | np.ndarray) -> Tensor:
    """HEAR's audio as a float tensor: numpy arrays converted, integer samples scaled to
    [-1, 1) by 2^(bits - 1) (int16: 1/32768); float samples unchanged."""
    if isinstance(audio, np.ndarray):
        audio = torch.from_numpy(np.ascontiguousarray(audio))
    if not isinstance(audio, Tensor):
        raise ValueError(
            f"audio: expected a torch tensor or numpy array, got {type(audio).__name__}"
        )
    if audio.dtype == torch.bool or audio.is_complex():
        raise ValueError(f"audio: expected real samples, got dtype {audio.dtype}")
    if not audio.is_floating_point():
        bits = torch.iinfo(audio.dtype).bits
        return audio.float() / 2 ** (bits - 1)
    return audio


def get_scene_embeddings(audio: Tensor | np.ndarray, model: HearModel) -> Tensor:
    """audio: (n, samples) at 16 kHz -> (n, scene_embedding_size) float32."""
    with torch.inference_mode():
        result = model.embedder.embed(as_waves(audio), [model.layer], "mean")
        return result.pooled(0, "mean").float()


def get_timestamp_embeddings(audio: Tensor | np.ndarray, model: HearModel) -> tuple[Tensor, Tensor]:
    """audio: (n, samples) at 16 kHz -> embeddings (n, steps, timestamp_embedding_size)
    float32 and timestamps (n, steps) float32 in milliseconds, increasing, inside the clip,
    every `model.timestamp_hop_ms` (at most; see the module docstring)."""
    waves = as_waves(audio)
    windowing = model.embedder.windowing
    offsets = [0]  # in frames
    if model.timestamp_hop_ms is not None:
        hop = max(1, int(model.timestamp_hop_ms // windowing.shift_ms))
        offsets = list(range(0, windowing.stride_frames, hop))
    steps, times = [], []
    with torch.inference_mode():
        for offset in offsets:
            begin = offset * windowing.shift_samples
            if (
                offset
                and waves.shape[-1] - begin < windowing.patch_frames * windowing.shift_samples
            ):
                break  # less than one patch left: no step of this pass lies on audio
            result = model.embedder.embed(waves[..., begin:], [model.layer], model.freq)
            steps.append(result.steps[0].float())
            times.append(result.times_ms + offset * windowing.shift_ms)
    order = torch.cat(times).argsort()
    embeddings = torch.cat(steps, dim=1)[:, order.to(steps[0].device)]
    stamps = torch.cat(times)[order].to(embeddings.device).expand(embeddings.shape[0], -1)
    return embeddings, stamps.contiguous()
