"""`ssamba predict AUDIO... --ckpt FILE --out preds.csv|preds.json`: label audio files.

FILE is a classifier that the one loader reads (`load_encoder_file`): the `encoder.pt` of a
fine-tuning run, an adapter run's `adapters.pt`, a fine-tuning `.ckpt`, an exported encoder
file or folder. Each file is scored as `ssamba evaluate` scores a clip: the features the
classifier was trained on, cut from the start into windows of the encoder's input length
(a shorter file is padded as in training), pooled as the head was trained (`pooling`,
`ignore_padding`), then the head. A file of one window gets exactly evaluate's scores; a
longer one gets the mean of its windows' probabilities, and with `--timeline` one row per
window as well (start and end in seconds).

Probabilities: softmax over the classes, or a sigmoid per class for a multi-label
classifier. Single-label: the `--top-k` most likely labels; multi-label: every label whose
probability reaches `--threshold` (most likely first).

Outputs:
  .csv   a header, then per file a row `scope=clip` (start 0, end = the file's length) and,
         with --timeline, rows `scope=window`; labels and probabilities as `;`-separated
         lists, most likely first; a file that could not be read: a row with `error`
  .json  a list, one record per file: {"file", "duration_s", "labels", "probabilities"
         [, "timeline": [{"start_s", "end_s", "labels", "probabilities"}, ...]]} or
         {"file", "error"}

Exit status: 0 every file labelled, 1 some could not be read (named, with the reason, on
stderr and in the output; the others are labelled), 2 bad options or classifier.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from ssamba.audio import AudioError, load_audio
from ssamba.embed import Embedder
from ssamba.embed.cli import collect_sources
from ssamba.files import atomic_path, atomic_write_text
from ssamba.models.encoder_file import load_encoder_file

PROG = "ssamba predict"
FORMATS = (".csv", ".json")
CSV_COLUMNS = ("file", "scope", "start_s", "end_s", "labels", "probabilities", "error")


@dataclass
class Labelled:
    """One span's decision: labels most likely first, with their probabilities."""

    start_s: float
    end_s: float
    labels: list[str]
    probabilities: list[float]


@dataclass
class Prediction:
    """A file's labels (`clip`), its windows' (`timeline`), or why it could not be read."""

    file: str
    clip: Labelled | None = None
    timeline: list[Labelled] | None = None
    error: str | None = None


class Predictor:
    """A classifier file with its features: waveforms in, class probabilities out."""

    def __init__(self, path: str | Path, batch_size: int = 8, device: str = "cpu") -> None:
        bundle = load_encoder_file(path)
        self.head = bundle.classifier().to(device)
        count = self.head[1].out_features
        self.labels = list(bundle.labels or [f"class_{i}" for i in range(count)])
        if len(self.labels) != count:
            raise ValueError(f"{path}: {len(self.labels)} labels for a head of {count} classes")
        self.pooling, self.ignore_padding = bundle.pooling, bundle.ignore_padding
        self.multilabel = bundle.multilabel
        self.embedder = Embedder(bundle, batch_size=batch_size).to(device)

    def window_probabilities(self, wave: Tensor) -> tuple[Tensor, list[tuple[float, float]]]:
        """wave (samples,) at 16 kHz -> probabilities (windows, classes) and each window's
        (start, end) in seconds, windows following each other from the file's start."""
        embedder = self.embedder
        windowing = embedder.windowing
        starts = windowing.plan(wave.shape[0]).starts
        encoder = embedder.encoder
        device = encoder.pos_embed.device
        rate = embedder.sample_rate
        probabilities, spans = [], []
        for begin in range(0, len(starts), embedder.batch_size):
            chunk = starts[begin : begin + embedder.batch_size]
            fbank = torch.stack([embedder.window_fbank(wave, s) for s in chunk]).to(device)
            keep = None
            if self.ignore_padding:  # the window's own frames, as the batches' `frames`
                own = [embedder.fbank.num_frames(e - b) for b, e in self._samples(chunk, wave)]
                frames = torch.tensor(own, device=device).clamp(1, encoder.cfg.input_frames)
                keep = encoder.clip_patches(frames)
            pooled = encoder.pool(encoder.forward_features(fbank), self.pooling, keep)
            logits = self.head(pooled).float()
            probabilities.append(logits.sigmoid() if self.multilabel else logits.softmax(-1))
            spans += [(b / rate, e / rate) for b, e in self._samples(chunk, wave)]
        return torch.cat(probabilities).cpu(), spans

    def _samples(self, starts: Sequence[int], wave: Tensor) -> list[tuple[int, int]]:
        return [self.embedder.windowing.window_samples(s, wave.shape[0]) for s in starts]

    def decide(self, probabilities: Tensor, top_k: int, threshold: float) -> tuple[list, list]:
        """(labels, probabilities) of one span, most likely first: the top k, or for a
        multi-label classifier every label at or over the threshold."""
        order = probabilities.argsort(descending=True).tolist()
        if self.multilabel:
            order = [i for i in order if probabilities[i] >= threshold]
        else:
            order = order[:top_k]
        return [self.labels[i] for i in order], [round(float(probabilities[i]), 6) for i in order]

    def predict(self, wave: Tensor, top_k: int, threshold: float, timeline: bool) -> tuple:
        """(clip decision, window decisions or None) of one file."""
        with torch.inference_mode():
            windows, spans = self.window_probabilities(wave)
        duration = wave.shape[0] / self.embedder.sample_rate
        clip = Labelled(0.0, duration, *self.decide(windows.mean(0), top_k, threshold))
        if not timeline:
            return clip, None
        rows = [
            Labelled(start, end, *self.decide(p, top_k, threshold))
            for p, (start, end) in zip(windows, spans, strict=True)
        ]
        return clip, rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("audio", nargs="+", type=Path, help="audio files and/or folders")
    parser.add_argument(
        "--ckpt", required=True, help="a fine-tuned classifier (encoder.pt, adapters.pt, .ckpt)"
    )
    parser.add_argument("--out", required=True, type=Path, help="preds.csv or preds.json")
    parser.add_argument("--top-k", type=int, default=3, help="labels per row (single-label)")
    parser.add_argument(
        "--threshold",
        type=float,
        default=0.5,
        help="multi-label classifiers: every label with at least this probability",
    )
    parser.add_argument(
        "--timeline", action="store_true", help="also one row per window, with start and end"
    )
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_options(args)
        predictor = Predictor(args.ckpt, batch_size=args.batch_size, device=args.device)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    sources, _, missing = collect_sources(args.audio)
    predictions = [Prediction(m.split(": ", 1)[0], error=m.split(": ", 1)[1]) for m in missing]
    for source in tqdm(sources, unit="file", disable=len(sources) < 2):
        try:
            wave, _ = load_audio(source.path, target_sr=predictor.embedder.sample_rate)
        except AudioError as err:
            predictions.append(Prediction(str(source.path), error=str(err)))
            continue
        clip, rows = predictor.predict(wave, args.top_k, args.threshold, args.timeline)
        predictions.append(Prediction(str(source.path), clip, rows))
    write_predictions(args.out, predictions)
    failed = [p for p in predictions if p.error]
    print(f"{PROG}: labelled {len(predictions) - len(failed)} file(s) -> {args.out}")
    for prediction in failed:
        print(f"{PROG}: FAILED {prediction.file}: {prediction.error}", file=sys.stderr)
    return 1 if failed else 0


def check_options(args: argparse.Namespace) -> None:
    if args.out.suffix.lower() not in FORMATS:
        raise ValueError(f"--out {args.out}: expected a .csv or .json file")
    if args.top_k < 1:
        raise ValueError(f"--top-k: must be >= 1, got {args.top_k}")
    if not 0.0 <= args.threshold <= 1.0:
        raise ValueError(f"--threshold: must be within [0, 1], got {args.threshold}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size: must be >= 1, got {args.batch_size}")


def write_predictions(path: Path, predictions: Sequence[Prediction]) -> None:
    """Write `predictions` as CSV or JSON (by suffix; see the module docstring)."""
    if path.suffix.lower() == ".json":
        atomic_write_text(path, json.dumps([_record(p) for p in predictions], indent=1) + "\n")
        return
    with atomic_path(path) as staged, staged.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, CSV_COLUMNS)
        writer.writeheader()
        for prediction in predictions:
            if prediction.error:
                writer.writerow({"file": prediction.file, "error": prediction.error})
                continue
            spans = [("clip", prediction.clip)] + [("window", r) for r in prediction.timeline or []]
            for scope, span in spans:
                writer.writerow(
                    {
                        "file": prediction.file,
                        "scope": scope,
                        "start_s": f"{span.start_s:.3f}",
                        "end_s": f"{span.end_s:.3f}",
                        "labels": ";".join(span.labels),
                        "probabilities": ";".join(f"{p:.6f}" for p in span.probabilities),
                    }
                )


def _record(prediction: Prediction) -> dict[str, Any]:
    if prediction.error:
        return {"file": prediction.file, "error": prediction.error}
    clip = prediction.clip
    record: dict[str, Any] = {
        "file": prediction.file,
        "duration_s": round(clip.end_s, 6),
        "labels": clip.labels,
        "probabilities": clip.probabilities,
    }
    if prediction.timeline is not None:
        record["timeline"] = [
            {
                "start_s": round(r.start_s, 6),
                "end_s": round(r.end_s, 6),
                "labels": r.labels,
                "probabilities": r.probabilities,
            }
            for r in prediction.timeline
        ]
    return record
