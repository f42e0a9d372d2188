"""Waveforms in, embeddings out: an encoder file's encoder with the features it was trained on.

Each window of a clip (see `ssamba.embed.windows`) becomes a filterbank exactly as in
training (`clip_features`, evaluation mode, the feature settings the encoder file carries),
goes through the encoder, and its patch tokens are regrouped per time patch:

    window (samples,) -> fbank (input_frames, mel_bins) -> tokens (prefix + F'*T', D)
        -> patch grid (F', T', D) -> time steps (T', D)       freq="mean": average over F'
                                  -> time steps (T', F'*D)    freq="concat": F' patches side by side

The time steps of consecutive windows are stitched into one sequence; steps that cover
only padding are dropped, so an embedding describes real audio only: "mean" pooling of a
clip is the average of its real patch tokens, "cls" pooling the average of the windows'
cls tokens.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ssamba.embed.windows import Windowing
from ssamba.features import FbankConfig, clip_features
from ssamba.models.encoder import AudioEncoder
from ssamba.models.encoder_file import EncoderFile, load_encoder_file

FreqMode = Literal["mean", "concat"]
PoolMode = Literal["mean", "cls", "none"]


def trained_features(bundle: EncoderFile) -> FbankConfig:
    """The feature settings `bundle`'s encoder was trained with, in inference form.

    Files that do not say (official AuM and fine-tuned checkpoints) get `FbankConfig()`,
    the AudioSet + LibriSpeech pretraining statistics at 16 kHz with 128 mel bins, and a
    warning naming the file: embeddings of an encoder fed other statistics than it was
    trained on are shifted without any other sign.
    """
    if bundle.features is not None:
        return bundle.features.for_inference()
    default = FbankConfig()
    warnings.warn(
        f"{bundle.provenance.get('source', 'encoder')}: the file does not record the "
        f"features its encoder was trained on; using the pretraining defaults (AudioSet + "
        f"LibriSpeech mean {default.mean}, std {default.std}, {default.sample_rate} Hz, "
        f"{default.num_mel_bins} mel bins)",
        stacklevel=3,
    )
    return default


def check_waves(waves: Tensor) -> None:
    """ValueError unless waves is (clips >= 1, samples >= 1) of finite samples; names the clip."""
    if waves.dim() != 2:
        raise ValueError(f"audio: expected (clips, samples), got shape {tuple(waves.shape)}")
    if waves.shape[0] == 0 or waves.shape[1] == 0:
        raise ValueError(
            f"audio: shape {tuple(waves.shape)} holds no audio; pass at least one clip of "
            f"at least one sample"
        )
    finite = torch.isfinite(waves).all(dim=1)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite).flatten().tolist()
        more = f" (clips {', '.join(map(str, bad[:10]))}{', ...' if len(bad) > 10 else ''})"
        raise ValueError(
            f"audio: clip {bad[0]} has NaN or infinite samples{more if len(bad) > 1 else ''}; "
            f"its embedding would be NaN"
        )


def time_steps(encoder: AudioEncoder, tokens: Tensor, freq: FreqMode) -> Tensor:
    """tokens (B, prefix + F'*T', D) -> (B, T', D) (freq "mean") or (B, T', F'*D) ("concat",
    the F' frequency patches of a time step side by side, lowest band first)."""
    f, t = encoder.grid
    grid = encoder.patch_tokens(tokens).unflatten(1, (f, t))  # frequency-major
    if freq == "mean":
        return grid.mean(dim=1)
    return grid.permute(0, 2, 1, 3).flatten(2)


@dataclass
class Embeddings:
    """Embeddings of a batch of equal-length clips, for each requested layer.

    steps: per layer (clips, time_steps, dim), dim = D (freq "mean") or F'*D ("concat");
    cls: per layer (clips, D), the prefix token averaged over windows;
    times_ms: (time_steps,) centre of each step; freq: how `steps` treat the F' frequency
    patches of a time step.
    """

    steps: list[Tensor]
    cls: list[Tensor]
    times_ms: Tensor
    freq: FreqMode
    freq_patches: int

    def pooled(self, layer: int, how: Literal["mean", "cls"]) -> Tensor:
        """One vector per clip: (clips, D), the mean of the real patch tokens or of the cls tokens."""
        if how == "cls":
            return self.cls[layer]
        mean = self.steps[layer].mean(dim=1)
        if self.freq == "concat":
            mean = mean.unflatten(1, (self.freq_patches, -1)).mean(dim=1)
        return mean


class Embedder(nn.Module):
    """An encoder with the feature settings it was trained with: waveforms in, embeddings out.

    Call `embed` under `torch.inference_mode()` unless gradients should reach the encoder.
    """

    sample_rate = 16000

    def __init__(
        self,
        bundle: EncoderFile,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        batch_size: int = 8,
    ) -> None:
        """bundle: the encoder and its features (`load_encoder_file`); see `trained_features`
        for files without features. Window and hop: see `Windowing.for_encoder`."""
        super().__init__()
        encoder = bundle.encoder
        fbank = trained_features(bundle)
        if fbank.sample_rate != self.sample_rate:
            raise ValueError(
                f"{bundle.provenance.get('source', 'encoder')}: features at "
                f"{fbank.sample_rate} Hz; embedding reads {self.sample_rate} Hz audio"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size): must be >= 1, got {batch_size}")
        # The encoder reads exactly input_frames; evaluation cuts from the start, unaugmented.
        self.fbank = replace(fbank, target_length=encoder.cfg.input_frames)
        self.encoder = encoder.eval()
        self.windowing = Windowing.for_encoder(encoder, self.fbank, window_seconds, hop_seconds)
        self.batch_size = batch_size

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Embedder:
        """From any file `load_encoder_file` reads: an encoder file, a Lightning `.ckpt` of
        ssamba's tasks, or an official SSAMBA/SSAST/AuM checkpoint. Raises FileNotFoundError
        or CheckpointError (a ValueError) with one line naming the file."""
        return cls(load_encoder_file(path), **kwargs)

    @property
    def num_layers(self) -> int:
        """Entries of `forward_features(return_layers=True)`: blocks, or block pairs."""
        return self.encoder.cfg.num_layers

    @property
    def freq_patches(self) -> int:
        return self.encoder.grid[0]

    @property
    def embed_dim(self) -> int:
        return self.encoder.embed_dim

    def step_dim(self, freq: FreqMode) -> int:
        """Size of one time-step embedding."""
        return self.embed_dim * (self.freq_patches if freq == "concat" else 1)

    def embed(
        self,
        waves: Tensor,
        layers: Sequence[int] = (-1,),
        freq: FreqMode = "mean",
        progress: bool = False,
    ) -> Embeddings:
        """Embed equal-length clips. waves: (clips, samples) mono at 16 kHz, finite.

        `layers` index `forward_features(return_layers=True)` (-1: the final normalised
        output). Windows of all clips go through the encoder `batch_size` at a time;
        `progress` shows a bar when that takes more than one pass.
        """
        check_waves(waves)
        if freq not in ("mean", "concat"):
            raise ValueError(f"freq: expected 'mean' or 'concat', got {freq!r}")
        layers = [self.check_layer(i) for i in layers]
        plan = self.windowing.plan(waves.shape[1])
        items = [(c, w) for c in range(waves.shape[0]) for w in range(len(plan.starts))]
        steps: list[list[list[Tensor]]] = [[[] for _ in range(waves.shape[0])] for _ in layers]
        cls: list[list[Tensor]] = [[] for _ in layers]
        bar = tqdm(
            total=len(items),
            unit="window",
            leave=False,
            disable=not progress or len(items) <= self.batch_size,
        )
        for begin in range(0, len(items), self.batch_size):
            chunk = items[begin : begin + self.batch_size]
            fbank = torch.stack([self.window_fbank(waves[c], plan.starts[w]) for c, w in chunk])
            outputs = self.encoder.forward_features(fbank.to(self._device), return_layers=True)
            for slot, index in enumerate(layers):
                tokens = outputs[index]
                per_step = time_steps(self.encoder, tokens, freq)
                cls[slot].append(self.encoder.pool(tokens, "cls"))
                for row, (c, w) in enumerate(chunk):
                    steps[slot][c].append(per_step[row, plan.steps[w].to(per_step.device)])
            bar.update(len(chunk))
        bar.close()
        windows = len(plan.starts)
        return Embeddings(
            steps=[torch.stack([torch.cat(clip) for clip in per_layer]) for per_layer in steps],
            cls=[torch.cat(chunks).view(-1, windows, self.embed_dim).mean(1) for chunks in cls],
            times_ms=plan.times_ms,
            freq=freq,
            freq_patches=self.freq_patches,
        )

    @property
    def _device(self) -> torch.device:
        return self.encoder.pos_embed.device

    def check_layer(self, layer: int) -> int:
        """`layer` as a non-negative index, or a ValueError naming the valid range."""
        if not -self.num_layers <= layer < self.num_layers:
            raise ValueError(
                f"layer (--layer) = {layer}: this encoder has {self.num_layers} layers "
                f"(0..{self.num_layers - 1}, or -1 for the last)"
            )
        return layer % self.num_layers

    def window_fbank(self, wave: Tensor, start_frame: int) -> Tensor:
        """Normalised (input_frames, mel_bins) of one window; a slice shorter than one
        analysis frame (only a clip that short) is zero-padded to one frame."""
        begin, end = self.windowing.window_samples(start_frame, wave.shape[0])
        piece = wave[begin:end].detach().float().cpu()
        shortfall = self.fbank.frame_length_samples - piece.shape[0]
        if shortfall > 0:
            piece = nn.functional.pad(piece, (0, shortfall))
        return clip_features(piece, self.sample_rate, self.fbank, train=False)
