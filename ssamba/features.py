"""Model inputs from waveforms: Kaldi filterbanks exactly as SSAST/SSAMBA/AuM compute them.

The pretrained checkpoints only give their published results on inputs built the same
way, so every step here mirrors `dataloader.py` of the originals (docs/originals.md#features):

    wave (16 kHz) -> remove DC -> kaldi fbank (128 mel, 25 ms / 10 ms, hanning, htk)
         -> zero-pad or cut to `target_length` frames          (before normalising;
            `pad="floor"` pads with the clip's quietest level per bin instead)
         -> SpecAugment (train only; masked bins become 0 in the log-mel domain)
         -> (x - mean) / (2 * std)                              (the deliberate factor 2)
         -> noise + roll (train only, when `noise`)

Mixup lives on waveforms *before* this chain (`mix_waves` + `mix_targets`), because it
needs a second clip and its label: the training dataset draws the partner and lambda
(`sample_mixup_lambda`), mixes the two waves and targets, then calls `clip_features`.

Shapes: waveforms are mono `(samples,)`; filterbanks are `(frames, n_mels)`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import torch
import torchaudio

from ssamba.configs import dataclass_from_dict

# (mean, std) of the log-mel filterbank per dataset, as published with the originals.
DATASET_STATS: dict[str, tuple[float, float]] = {
    "asli": (-4.2677393, 4.5689974),  # AudioSet + LibriSpeech pretraining, also AudioSet
    "audioset": (-4.2677393, 4.5689974),
    "librispeech": (-4.2677393, 4.5689974),
    "esc50": (-6.6268077, 5.358466),
    "speechcommands": (-6.845978, 5.5654526),
    "urbansound8k": (-5.138444, 4.229961),
    "vggsound": (-5.0767093, 4.4533687),
    "voxceleb": (-3.7614744, 4.2011642),
}

CropMode = Literal["random", "center", "start"]
# "zeros": the originals' log-mel 0, which after normalisation reads as loud broadband
# sound (+0.95 with FSDD's stats); "floor": each bin's minimum over the clip's own frames,
# i.e. the recording's silence (docs/learning-quality.md).
PadMode = Literal["zeros", "floor"]


@dataclass
class FbankConfig:
    """How to turn a 16 kHz waveform into the `(target_length, n_mels)` model input.

    Defaults reproduce SSAST/SSAMBA pretraining (1024 frames, AudioSet+LibriSpeech stats,
    no augmentation). `crop="start"` is the originals' cut; `random` is a training-time
    augmentation (evaluation then cuts from the start, so results stay deterministic).
    `target_length=None` keeps every frame (no pad or cut).
    `kind="mfcc"` swaps the filterbank for `num_ceps` Kaldi MFCCs over the same frames.
    `pad` fills clips shorter than `target_length`: "zeros" (faithful) or "floor" (each
    bin's quietest value in the clip, so padding looks like the recording's silence).
    """

    sample_rate: int = 16000
    num_mel_bins: int = 128
    frame_shift_ms: float = 10.0
    frame_length_ms: float = 25.0
    target_length: int | None = 1024
    mean: float = DATASET_STATS["asli"][0]
    std: float = DATASET_STATS["asli"][1]
    crop: CropMode = "start"
    freqm: int = 0
    timem: int = 0
    noise: bool = False
    kind: Literal["fbank", "mfcc"] = "fbank"
    num_ceps: int = 40
    pad: PadMode = "zeros"

    def __post_init__(self) -> None:
        if self.crop not in ("random", "center", "start"):
            raise ValueError(f"FbankConfig.crop: {self.crop!r} is not random|center|start")
        if self.kind not in ("fbank", "mfcc"):
            raise ValueError(f"FbankConfig.kind: {self.kind!r} is not fbank|mfcc")
        if self.pad not in ("zeros", "floor"):
            raise ValueError(f"FbankConfig.pad: {self.pad!r} is not zeros|floor")
        if self.std <= 0:
            raise ValueError(f"FbankConfig.std: must be > 0, got {self.std}")
        if self.target_length is not None and self.target_length <= 0:
            raise ValueError(f"FbankConfig.target_length: must be > 0, got {self.target_length}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FbankConfig:
        """From saved fields (an encoder file); unknown keys are an error naming them."""
        return dataclass_from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def for_inference(self) -> FbankConfig:
        """These settings as an encoder file stores them: no augmentation, cut at the start."""
        return replace(self, crop="start", freqm=0, timem=0, noise=False)

    @property
    def feature_dim(self) -> int:
        """Bins per frame: `num_mel_bins` for fbank, `num_ceps` for MFCC."""
        return self.num_ceps if self.kind == "mfcc" else self.num_mel_bins

    @property
    def frame_length_samples(self) -> int:
        return int(self.sample_rate * self.frame_length_ms / 1000)

    def num_frames(self, num_samples: int) -> int:
        """Frames Kaldi produces for `num_samples` (snip_edges): 998 for 10 s at 16 kHz."""
        shift = int(self.sample_rate * self.frame_shift_ms / 1000)
        if num_samples < self.frame_length_samples:
            return 0
        return 1 + (num_samples - self.frame_length_samples) // shift


def kaldi_options(cfg: FbankConfig) -> dict[str, Any]:
    """Keyword arguments of `torchaudio.compliance.kaldi.fbank` (or `.mfcc` for kind mfcc)
    that `wav_to_fbank` passes: the originals' settings (also written into exported models'
    input recipes)."""
    options: dict[str, Any] = dict(
        sample_frequency=cfg.sample_rate,
        htk_compat=True,
        use_energy=False,
        window_type="hanning",
        num_mel_bins=cfg.num_mel_bins,
        dither=0.0,
        frame_shift=cfg.frame_shift_ms,
        frame_length=cfg.frame_length_ms,
    )
    if cfg.kind == "mfcc":
        options["num_ceps"] = cfg.num_ceps
    return options


# `target_length: auto`: this quantile of the clips' durations (stats.json), in frames,
# rounded up to a multiple of 16 (the time size of every recipe's 16 x 16 patches, and a
# multiple of the 2- and 4-frame widths of frame and 16 x 4 patches), at most 1024 (the
# originals' 10.24 s window).
AUTO_QUANTILE = "p90"
AUTO_MULTIPLE = 16
AUTO_MAX_FRAMES = 1024


@dataclass(frozen=True)
class FeatureConfig:
    """What a recipe says about the model input (`data.features`), the same for
    pretraining and fine-tuning; `ssamba.data.transforms.resolve_features` turns it into
    the concrete `FbankConfig` of a shard folder.

    kind: "fbank" (the originals' log-mel filterbank) or "mfcc" (`num_ceps` Kaldi MFCCs
        over the same frames; the encoder then reads `num_ceps` bins).
    num_mel_bins: mel bins of the Kaldi filterbank.
    num_ceps: MFCC coefficients per frame.
    target_length: frames per example (1024 = 10.24 s, the originals' pretraining; ESC-50
        512, Speech Commands 128); longer clips are cropped, shorter ones padded. "auto":
        the 90th percentile of the shard folder's clip durations (its stats.json), in
        frames, rounded up to a multiple of 16, at most 1024.
    stats: normalisation: "shards" (stats.json of the shard folder), a published dataset
        name ("asli", "esc50", ...; needed to match official checkpoints) or [mean, std].
    pad: how clips shorter than `target_length` are filled: "zeros" (the originals: log-mel
        0, loud after normalisation) or "floor" (each bin's quietest value in the clip).
    """

    kind: Literal["fbank", "mfcc"] = "fbank"
    num_mel_bins: int = 128
    num_ceps: int = 40
    target_length: int | Literal["auto"] = 1024
    stats: str | tuple[float, float] = "shards"
    pad: PadMode = "zeros"

    def __post_init__(self) -> None:
        if self.target_length != "auto" and (
            not isinstance(self.target_length, int) or self.target_length <= 0
        ):
            raise ValueError(
                f"data.features.target_length: frames > 0 or 'auto', got {self.target_length!r}"
            )


DEFAULT_FEATURES = FeatureConfig()


def auto_target_length(seconds: float, sample_rate: int = 16000, shift_ms: float = 10.0) -> int:
    """Frames of a clip lasting `seconds` (Kaldi framing: 25 ms windows every `shift_ms`),
    rounded up to a multiple of `AUTO_MULTIPLE`, at most `AUTO_MAX_FRAMES`.

    FSDD's 90th percentile, 0.605 s, is 59 frames -> 64."""
    cfg = FbankConfig(sample_rate=sample_rate, frame_shift_ms=shift_ms)
    frames = max(1, cfg.num_frames(round(seconds * sample_rate)))
    return min(AUTO_MAX_FRAMES, math.ceil(frames / AUTO_MULTIPLE) * AUTO_MULTIPLE)


def wav_to_fbank(
    wave: torch.Tensor,
    sr: int,
    cfg: FbankConfig,
    *,
    crop: CropMode | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Log-mel filterbank of a mono wave, padded/cut to `cfg.target_length` (unnormalised).

    wave: (samples,) float at `cfg.sample_rate`. Returns (frames, cfg.feature_dim), where
    frames = `cfg.target_length`, or every frame when that is None. `crop` overrides
    `cfg.crop` (the training/evaluation switch of `clip_features`).
    """
    if wave.dim() != 1:
        raise ValueError(f"wav_to_fbank: expected a mono (samples,) wave, got {tuple(wave.shape)}")
    if sr != cfg.sample_rate:
        raise ValueError(
            f"wav_to_fbank: wave is {sr} Hz but FbankConfig.sample_rate is {cfg.sample_rate}; "
            "resample first (ssamba.audio.load_audio does)"
        )
    if wave.numel() < cfg.frame_length_samples:
        raise ValueError(
            f"wav_to_fbank: {wave.numel()} samples is shorter than one "
            f"{cfg.frame_length_ms} ms frame ({cfg.frame_length_samples} samples)"
        )
    wave = wave.float()
    wave = (wave - wave.mean()).unsqueeze(0)  # DC removal, then Kaldi wants (channels, samples)
    if cfg.kind == "mfcc":
        feats = torchaudio.compliance.kaldi.mfcc(wave, **kaldi_options(cfg))
    else:
        feats = torchaudio.compliance.kaldi.fbank(wave, **kaldi_options(cfg))
    if cfg.target_length is None:
        return feats
    return pad_or_crop(feats, cfg.target_length, crop or cfg.crop, generator=generator, pad=cfg.pad)


def pad_or_crop(
    fbank: torch.Tensor,
    target_length: int,
    mode: CropMode = "start",
    generator: torch.Generator | None = None,
    pad: PadMode = "zeros",
) -> torch.Tensor:
    """Pad at the end or cut to `target_length` frames.

    fbank: (frames, bins) -> (target_length, bins). Padding happens in the log-mel domain
    *before* normalisation: zeros as the originals do, or with `pad="floor"` each bin's
    minimum over the clip (its silence). `mode` picks which window a long clip keeps: its
    start (faithful), its centre, or a random one (uses `generator`).
    """
    frames = fbank.shape[0]
    if frames < target_length:
        if pad == "floor":
            floor = fbank.min(dim=0, keepdim=True).values
            return torch.cat([fbank, floor.expand(target_length - frames, -1)])
        return torch.nn.functional.pad(fbank, (0, 0, 0, target_length - frames))
    excess = frames - target_length
    if mode == "start" or excess == 0:
        offset = 0
    elif mode == "center":
        offset = excess // 2
    elif mode == "random":
        offset = int(torch.randint(0, excess + 1, (1,), generator=generator))
    else:
        raise ValueError(f"pad_or_crop: mode {mode!r} is not random|center|start")
    return fbank[offset : offset + target_length]


def normalise(fbank: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """(x - mean) / (2 * std): the originals' scaling (the 2 is deliberate, ssast#3, ast#5)."""
    return (fbank - mean) / (2 * std)


def spec_augment(fbank: torch.Tensor, freqm: int, timem: int) -> torch.Tensor:
    """One frequency mask of width < `freqm` and one time mask of width < `timem`.

    fbank: (frames, bins) or (batch, frames, bins). Uses torchaudio's maskers (global RNG)
    so the mask distribution equals the originals'. 0 disables a mask.
    """
    spec = fbank.transpose(-1, -2)  # torchaudio masks (..., freq, time)
    if freqm > 0:
        spec = torchaudio.transforms.FrequencyMasking(freqm)(spec)
    if timem > 0:
        spec = torchaudio.transforms.TimeMasking(timem)(spec)
    return spec.transpose(-1, -2)


def noise_and_roll(fbank: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """SSAST's `noise=True`: add uniform noise scaled by rand/10, roll by [-10, 9] frames.

    fbank: (frames, bins), normalised. The shift range matches numpy's randint(-10, 10).
    """
    scale = torch.rand((), generator=generator) / 10
    noisy = fbank + torch.rand(fbank.shape, generator=generator) * scale
    shift = int(torch.randint(-10, 10, (1,), generator=generator))
    return torch.roll(noisy, shift, dims=0)


def sample_mixup_lambda(alpha: float = 10.0, rng: random.Random | None = None) -> float:
    """Mixing weight lambda ~ Beta(alpha, alpha); the originals use Beta(10, 10)."""
    return (rng or random).betavariate(alpha, alpha)


def mix_waves(wave_a: torch.Tensor, wave_b: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * a + (1 - lam) * b on DC-free waves, `b` zero-padded or cut to len(a).

    wave_a: (samples_a,), wave_b: (samples_b,) -> (samples_a,), DC removed again after mixing
    (as the originals do).
    """
    a = wave_a - wave_a.mean()
    b = wave_b - wave_b.mean()
    if b.numel() < a.numel():
        b = torch.nn.functional.pad(b, (0, a.numel() - b.numel()))
    mixed = lam * a + (1 - lam) * b[: a.numel()]
    return mixed - mixed.mean()


def mix_targets(target_a: torch.Tensor, target_b: torch.Tensor, lam: float) -> torch.Tensor:
    """lam * a + (1 - lam) * b: targets: (num_classes,) one-/multi-hot -> soft targets."""
    return lam * target_a + (1 - lam) * target_b


def clip_features(
    wave: torch.Tensor,
    sr: int,
    cfg: FbankConfig,
    *,
    train: bool,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """The whole per-clip chain of the originals: wave (samples,) -> (target_length, bins).

    `train=True` applies the configured crop, SpecAugment and noise/roll; evaluation cuts
    from the start and never augments, so it is deterministic.
    """
    fbank = wav_to_fbank(wave, sr, cfg, crop=cfg.crop if train else "start", generator=generator)
    if train and (cfg.freqm or cfg.timem):
        fbank = spec_augment(fbank, cfg.freqm, cfg.timem)
    fbank = normalise(fbank, cfg.mean, cfg.std)
    if train and cfg.noise:
        fbank = noise_and_roll(fbank, generator=generator)
    return fbank
