"""`ssamba embed`: embeddings of audio files and folders, written as .npy files.

`main(argv) -> int` (0: every input embedded, 1: some failed and were named, 2: bad
options or an encoder file that cannot be used). The work is `Embedder`'s; this module
finds the inputs, decodes them and writes the outputs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from ssamba.audio import AUDIO_EXTENSIONS, AudioError, load_audio
from ssamba.embed.embedder import Embedder, FreqMode, PoolMode
from ssamba.files import atomic_path, atomic_write_text, writable_folder

DESCRIPTION = """\
Embed audio files with an encoder: an encoder file (`ssamba pretrain`, `ssamba finetune`,
`ssamba export`), a Lightning .ckpt of `ssamba pretrain`/`ssamba finetune`, or an official
SSAMBA/SSAST/AuM checkpoint. Filterbanks are computed with the feature settings stored in
the file (sample rate, mel bins, normalisation mean/std); a file that stores none gets the
AudioSet + LibriSpeech pretraining statistics, with a warning. Files and folders (searched
recursively for {exts}) of any length: long files are cut into windows of the encoder's
input length.

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
    parser.add_argument(
        "--ckpt",
        required=True,
        type=Path,
        help="encoder file (encoder.pt), Lightning .ckpt of ssamba's tasks, or official .pth",
    )
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
        writable_folder(args.out.parent if stacked else args.out, "--out")
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
    with atomic_path(path) as staged, staged.open("wb") as handle:
        np.save(handle, matrix)
    atomic_write_text(path.with_suffix(".ids.txt"), "".join(f"{i}\n" for i in ids))


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
