"""Embeddings from an encoder file: `ssamba embed`, and the core the HEAR and s3prl adapters share.

The encoder takes a fixed number of frames (`EncoderConfig.input_frames`, 1024 = 10.24 s
for the pretraining geometry), so audio of any length is cut into windows of that length.
Each window becomes a filterbank exactly as in training (`clip_features`, evaluation mode,
the feature settings stored with the encoder), goes through the encoder, and its patch
tokens are regrouped per time patch:

    window (samples,) -> fbank (input_frames, mel_bins) -> tokens (prefix + F'*T', D)
        -> patch grid (F', T', D) -> time steps (T', D)       freq="mean": average over F'
                                  -> time steps (T', F'*D)    freq="concat": F' patches side by side

The time steps of consecutive windows are stitched into one sequence, one step per time
patch (every `stride` frames: 160 ms for 16x16 patches), timestamped at the centre of the
patch. By default windows follow each other without overlap and the steps form one uniform
grid; with a shorter `hop` every window contributes only the steps around its centre, where
the encoder saw context on both sides. Steps whose centre lies past the end of the audio
cover only padding and are dropped, so an embedding describes real audio only; "mean"
pooling of a file is therefore the average of its real patch tokens, and "cls" pooling the
average of the windows' cls tokens.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from ssamba.audio import AudioError, load_audio
from ssamba.features import FbankConfig, clip_features
from ssamba.models.checkpoints import CheckpointError, load_encoder, load_official
from ssamba.models.encoder import AudioEncoder

FreqMode = Literal["mean", "concat"]
PoolMode = Literal["mean", "cls", "none"]
# What soundfile (libsndfile >= 1.1) decodes; folders are searched for these.
AUDIO_EXTENSIONS = frozenset({".wav", ".flac", ".ogg", ".opus", ".mp3", ".aiff", ".aif", ".au"})
# Key of `extra` in an encoder file that holds the FbankConfig the encoder was trained with.
FBANK_KEY = "fbank"


# ---------------------------------------------------------------------------- windows
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
        """Samples between consecutive time steps (the s3prl downsample rate)."""
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


# ---------------------------------------------------------------------------- embedder
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

    Call `embed` under `torch.inference_mode()` unless gradients should reach the encoder
    (s3prl fine-tunes upstreams that way).
    """

    sample_rate = 16000

    def __init__(
        self,
        encoder: AudioEncoder,
        fbank: FbankConfig | None = None,
        window_seconds: float | None = None,
        hop_seconds: float | None = None,
        batch_size: int = 8,
    ) -> None:
        super().__init__()
        cfg = encoder.cfg
        fbank = fbank or FbankConfig()
        if fbank.feature_dim != cfg.num_mel_bins or fbank.sample_rate != self.sample_rate:
            raise ValueError(
                f"feature settings give {fbank.feature_dim} bins at {fbank.sample_rate} Hz but the "
                f"encoder expects {cfg.num_mel_bins} bins at {self.sample_rate} Hz"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size (--batch-size): must be >= 1, got {batch_size}")
        # The encoder reads exactly input_frames; evaluation cuts from the start, unaugmented.
        self.fbank = replace(fbank, target_length=cfg.input_frames, crop="start")
        self.encoder = encoder.eval()
        self.windowing = Windowing.for_encoder(encoder, self.fbank, window_seconds, hop_seconds)
        self.batch_size = batch_size

    @classmethod
    def from_file(cls, path: str | Path, **kwargs: Any) -> Embedder:
        """From an encoder file (`save_encoder`), or an official SSAMBA/SSAST/AuM checkpoint.

        The feature settings come from the file's `extra["fbank"]`; files without them
        (official checkpoints, older exports) get the pretraining defaults (AudioSet +
        LibriSpeech mean/std, 16 kHz, 128 mel bins).
        """
        encoder, fbank = load_encoder_and_features(path)
        return cls(encoder, fbank, **kwargs)

    @property
    def num_layers(self) -> int:
        """Entries of `forward_features(return_layers=True)`: blocks, or block pairs."""
        cfg = self.encoder.cfg
        paired = cfg.family != "ssast" and cfg.bidirectional_pairs
        return cfg.depth // 2 if paired else cfg.depth

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
        """Embed equal-length clips. waves: (clips, samples) mono at 16 kHz.

        `layers` index `forward_features(return_layers=True)` (-1: the final normalised
        output). Windows of all clips go through the encoder `batch_size` at a time;
        `progress` shows a bar when that takes more than one pass.
        """
        if waves.dim() != 2:
            raise ValueError(f"waves: expected (clips, samples), got {tuple(waves.shape)}")
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
            fbank = torch.stack([self._window_fbank(waves[c], plan.starts[w]) for c, w in chunk])
            outputs = self.encoder.forward_features(fbank.to(self._device), return_layers=True)
            for slot, index in enumerate(layers):
                tokens = outputs[index]
                per_step = self._time_steps(tokens, freq)
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

    def _window_fbank(self, wave: Tensor, start_frame: int) -> Tensor:
        """Normalised (input_frames, mel_bins) of one window; a slice shorter than one
        analysis frame (only a clip that short) is zero-padded to one frame."""
        begin, end = self.windowing.window_samples(start_frame, wave.shape[0])
        piece = wave[begin:end].detach().float().cpu()
        shortfall = self.fbank.frame_length_samples - piece.shape[0]
        if shortfall > 0:
            piece = nn.functional.pad(piece, (0, shortfall))
        return clip_features(piece, self.sample_rate, self.fbank, train=False)

    def _time_steps(self, tokens: Tensor, freq: FreqMode) -> Tensor:
        """tokens (B, prefix + F'*T', D) -> (B, T', D) or (B, T', F'*D)."""
        f, t = self.encoder.grid
        grid = self.encoder.patch_tokens(tokens).unflatten(1, (f, t))  # frequency-major
        if freq == "mean":
            return grid.mean(dim=1)
        return grid.permute(0, 2, 1, 3).flatten(2)


def load_encoder_and_features(path: str | Path) -> tuple[AudioEncoder, FbankConfig]:
    """The encoder of `path` and its feature settings (see `Embedder.from_file`)."""
    path = Path(path)
    try:
        encoder = load_encoder(path)
    except CheckpointError as err:
        if "not an ssamba encoder file" not in str(err):
            raise
        encoder, _ = load_official(path)
        return encoder, FbankConfig()
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    stored = payload.get("extra", {}).get(FBANK_KEY)
    return encoder, fbank_config_from_dict(stored, str(path)) if stored else FbankConfig()


def fbank_config_from_dict(data: dict[str, Any], source: str) -> FbankConfig:
    """FbankConfig from its saved fields; unknown keys are an error naming them."""
    known = {f.name for f in fields(FbankConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise CheckpointError(f"{source}: extra[{FBANK_KEY!r}] has unknown keys {unknown}")
    return FbankConfig(**data)


def fbank_config_to_dict(cfg: FbankConfig) -> dict[str, Any]:
    """What to store in an encoder file's `extra["fbank"]` so embeddings match training."""
    return asdict(cfg)


# ---------------------------------------------------------------------------- `ssamba embed`
DESCRIPTION = """\
Embed audio files with an encoder file (from `ssamba pretrain`/`ssamba export`, or an official
SSAMBA/SSAST/AuM checkpoint). Files and folders (searched recursively for
{exts}) of any length: long files are cut into windows of the encoder's input length.

outputs:
  --out emb.npy   pooled embeddings (--pool mean|cls) of all files stacked into one
                  (files, dim) float32 array, plus emb.ids.txt naming the file of each row
  --out DIR/      one DIR/<name>.npy per file, mirroring the folders given:
                    --pool mean|cls  (dim,)        one vector per file
                    --pool none      (steps, dim)  one vector per time patch (every
                                     160 ms for 16x16 patches), with DIR/<name>.times.npy
                                     holding the centre of each step in milliseconds
  dim = the encoder width, or width x frequency patches with --freq concat.

A file that cannot be read is reported (which file, why), the others are still embedded,
and the exit status is 1 at the end.
"""


@dataclass(frozen=True)
class Source:
    """One file to embed and the name of its outputs (relative path without suffix)."""

    path: Path
    name: str


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ssamba embed",
        description=DESCRIPTION.format(exts=" ".join(sorted(AUDIO_EXTENSIONS))),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("audio", nargs="+", type=Path, help="audio files and/or folders")
    parser.add_argument("--ckpt", required=True, type=Path, help="encoder file (encoder.pt)")
    parser.add_argument("--out", required=True, type=Path, help="emb.npy or a folder (see above)")
    parser.add_argument(
        "--layer", type=int, default=-1, help="which layer (block pair for SSAMBA); -1: the last"
    )
    parser.add_argument(
        "--pool",
        choices=["mean", "cls", "none"],
        default="mean",
        help="mean of the patch tokens (default), the cls token, or none: per time step",
    )
    parser.add_argument(
        "--freq",
        choices=["mean", "concat"],
        default="mean",
        help="with --pool none: average the frequency patches of a time step, or concatenate them",
    )
    parser.add_argument(
        "--window-seconds", type=float, help="window length (default and maximum: the encoder's)"
    )
    parser.add_argument(
        "--hop-seconds",
        type=float,
        help="hop between windows (default: the window, no overlap); overlapping windows "
        "keep each step from the window where it is most central",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stacked = args.out.suffix == ".npy"
    if stacked and args.pool == "none":
        parser.error("--pool none gives one array per file: --out must be a folder, not a .npy")
    sources, ignored, failures = collect_sources(args.audio)
    clash = name_clash(sources)
    if clash:
        parser.error(clash)
    try:
        embedder = Embedder.from_file(
            args.ckpt,
            window_seconds=args.window_seconds,
            hop_seconds=args.hop_seconds,
            batch_size=args.batch_size,
        ).to(args.device)
        embedder.check_layer(args.layer)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"ssamba embed: {err}", file=sys.stderr)
        return 2
    rows: list[np.ndarray] = []
    done: list[Source] = []
    for source in tqdm(sources, unit="file", disable=len(sources) < 2):
        try:
            wave, _ = load_audio(source.path, target_sr=embedder.sample_rate)
        except AudioError as err:
            failures.append(str(err))
            continue
        arrays = embed_file(embedder, wave, args.layer, args.pool, args.freq)
        if stacked:
            rows.append(arrays[0])
        else:
            write_file_outputs(args.out, source.name, arrays)
        done.append(source)
    if stacked and rows:
        write_stacked(args.out, np.stack(rows), [str(s.path) for s in done])
    print_summary(len(done), args.out, ignored, failures)
    return 1 if failures else 0


def collect_sources(inputs: Sequence[Path]) -> tuple[list[Source], list[Path], list[str]]:
    """Files to embed, files skipped in folders for their extension, and missing inputs.

    A file given by name is always tried (its decoder decides); folders are searched
    recursively for AUDIO_EXTENSIONS, and outputs mirror their layout.
    """
    sources: list[Source] = []
    ignored: list[Path] = []
    failures: list[str] = []
    for root in inputs:
        if root.is_file():
            sources.append(Source(root, root.stem))
        elif root.is_dir():
            for path in sorted(p for p in root.rglob("*") if p.is_file()):
                if path.suffix.lower() in AUDIO_EXTENSIONS:
                    sources.append(Source(path, path.relative_to(root).with_suffix("").as_posix()))
                else:
                    ignored.append(path)
        else:
            failures.append(f"{root}: no such file or folder")
    return sources, ignored, failures


def name_clash(sources: Sequence[Source]) -> str | None:
    """An error message if two inputs would write the same output name, else None."""
    seen: dict[str, Path] = {}
    for source in sources:
        if source.name in seen:
            return (
                f"{seen[source.name]} and {source.path} would both be written as "
                f"{source.name!r}: embed them into separate --out folders"
            )
        seen[source.name] = source.path
    return None


def embed_file(
    embedder: Embedder, wave: Tensor, layer: int, pool: PoolMode, freq: FreqMode
) -> list[np.ndarray]:
    """[(dim,)] for pool mean|cls, [(steps, dim), (steps,) times in ms] for none; float32."""
    with torch.inference_mode():
        result = embedder.embed(wave.unsqueeze(0), [layer], freq, progress=True)
    if pool == "none":
        arrays = [result.steps[0][0], result.times_ms]
    else:
        arrays = [result.pooled(0, pool)[0]]
    return [a.float().cpu().numpy() for a in arrays]


def write_file_outputs(out_dir: Path, name: str, arrays: Sequence[np.ndarray]) -> None:
    """out_dir/<name>.npy (and <name>.times.npy for per-step embeddings)."""
    target = out_dir / f"{name}.npy"
    target.parent.mkdir(parents=True, exist_ok=True)
    np.save(target, arrays[0])
    if len(arrays) > 1:
        np.save(out_dir / f"{name}.times.npy", arrays[1])


def write_stacked(path: Path, matrix: np.ndarray, ids: Sequence[str]) -> None:
    """path: (files, dim) float32, and <path stem>.ids.txt with one file per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, matrix)
    path.with_suffix(".ids.txt").write_text("".join(f"{i}\n" for i in ids))


def print_summary(done: int, out: Path, ignored: Sequence[Path], failures: Sequence[str]) -> None:
    print(f"ssamba embed: embedded {done} file(s) -> {out}")
    if ignored:
        shown = ", ".join(str(p) for p in ignored[:10])
        more = f" and {len(ignored) - 10} more" if len(ignored) > 10 else ""
        print(
            f"ssamba embed: ignored {len(ignored)} file(s) without an audio extension: {shown}{more}"
        )
    for failure in failures:
        print(f"ssamba embed: FAILED {failure}", file=sys.stderr)
    if failures:
        print(f"ssamba embed: {len(failures)} input(s) failed", file=sys.stderr)
