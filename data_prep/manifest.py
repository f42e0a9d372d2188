"""The manifest: one JSON line per clip, the hand-off from a corpus recipe to the shard writer.

Every `prepare_<corpus>` writes the same record shape, so one shard writer serves all
corpora and adding a corpus touches one new file:

    {"id": str, "path": str (absolute), "labels": list[str], "duration": float | None,
     "split": str, "fold": int (corpora with folds), "speaker": str (where known)}

`duration` comes from the file header (cheap) and is None when the header is unreadable;
such clips are not dropped here but reach the shard writer, which rejects them with the
decoder's reason, so every input is accounted for in one place.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import soundfile as sf

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3")
MANIFEST_NAME = "manifest.jsonl"
LABELS_NAME = "labels.csv"


def clip_record(
    clip_id: str,
    path: Path,
    labels: Iterable[str],
    split: str,
    *,
    fold: int | None = None,
    speaker: str | None = None,
) -> dict:
    """One manifest line; `duration` read from the header (None if unreadable)."""
    record: dict = {
        "id": clip_id,
        "path": str(Path(path).resolve()),
        "labels": list(labels),
        "duration": header_duration(path),
        "split": split,
    }
    if fold is not None:
        record["fold"] = int(fold)
    if speaker is not None:
        record["speaker"] = speaker
    return record


def header_duration(path: Path) -> float | None:
    """Seconds of audio as the header declares them; None when the header is unreadable."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError):
        return None
    return info.frames / info.samplerate if info.samplerate > 0 else None


def find_audio(root: Path) -> list[Path]:
    """Audio files under `root`, any depth, sorted so manifests are reproducible."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS)


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else a FileNotFoundError saying which corpus file is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def write_manifest(records: list[dict], out_dir: Path) -> Path:
    """Write `out_dir/manifest.jsonl`; ids must be unique (they become shard keys)."""
    counts = Counter(r["id"] for r in records)
    duplicates = [clip_id for clip_id, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"duplicate clip ids in manifest, e.g. {duplicates[:3]}")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    with path.open("w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


def read_manifest(path: Path) -> list[dict]:
    """Records of a manifest, with the line number in the error if one is malformed."""
    records = []
    with Path(path).open() as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{line_no}: not JSON ({err})") from err
            missing = {"id", "path", "labels", "split"} - record.keys()
            if missing:
                raise ValueError(f"{path}:{line_no}: missing fields {sorted(missing)}")
            records.append(record)
    return records


def write_labels(classes: list[tuple[str, str]], out_dir: Path) -> Path:
    """`labels.csv` (index,id,name): the class order the label vectors use.

    classes: (id, display name) in index order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LABELS_NAME
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["index", "id", "name"])
        for index, (class_id, name) in enumerate(classes):
            writer.writerow([index, class_id, name])
    return path


def read_labels(path: Path) -> list[tuple[str, str]]:
    """(id, name) in index order from a `labels.csv`."""
    with Path(path).open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["index"]))
    return [(row["id"], row["name"]) for row in rows]


def finish(records: list[dict], out_dir: Path, classes: list[tuple[str, str]] | None) -> Path:
    """Write the manifest and (for labelled corpora) labels.csv; return the manifest path."""
    if classes is not None:
        write_labels(classes, out_dir)
    return write_manifest(records, out_dir)


def iter_split_counts(records: list[dict]) -> Iterator[tuple[str, int]]:
    """(split, clips) in first-seen order, for the summary lines the CLI prints."""
    yield from Counter(r["split"] for r in records).items()
