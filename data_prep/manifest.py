"""The manifest: one JSON line per clip, the hand-off from a corpus recipe to the shard writer.

Every `prepare_<corpus>` writes the same record shape, so one shard writer serves all
corpora and adding a corpus touches one new file:

    {"id": str, "path": str (absolute), "labels": list[str], "duration": float | None,
     "split": str, "fold": int (corpora with folds), "speaker": str (where known),
     any other field (a clip list's own columns; copied into the sample's json),
     "reject": str (only for an input known not to be a clip, e.g. `notes.txt`)}

`duration` comes from the file header (cheap) and is None when the header is unreadable;
such clips are not dropped here but reach the shard writer, which rejects them with the
decoder's reason, so every input is accounted for in one place. For the same reason a
recipe that meets a file it will not decode lists it with a `reject` reason instead of
skipping it: the shard writer puts it straight into rejects.jsonl.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath

import soundfile as sf

from ssamba.audio import AUDIO_EXTENSIONS
from ssamba.data.shard_format import MANIFEST_NAME, write_labels

REQUIRED_FIELDS = ("id", "path", "labels", "split")
# Folder and clip-list split names -> the split written (`valid` is what recipes filter on).
SPLIT_NAMES = {
    "train": "train",
    "valid": "valid",
    "val": "valid",
    "validation": "valid",
    "test": "test",
}


def clip_record(
    clip_id: str,
    path: Path,
    labels: Iterable[str],
    split: str,
    *,
    fold: int | None = None,
    speaker: str | None = None,
    extra: dict | None = None,
) -> dict:
    """One manifest line; `duration` read from the header (None if unreadable).

    extra: further fields kept in the sample's json (they must not reuse a field name).
    """
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
    for field, value in (extra or {}).items():
        if field in record:
            raise ValueError(f"{path}: extra field {field!r} would replace the clip's own")
        record[field] = value
    return record


def rejected_record(clip_id: str, path: Path, split: str, reason: str) -> dict:
    """The manifest line of a file the shard writer is to reject without decoding it."""
    path = Path(path).resolve()
    return {
        "id": clip_id,
        "path": str(path),
        "labels": [],
        "duration": None,
        "split": split,
        "reject": reason,
    }


def not_audio_reason(path: Path) -> str:
    return f"not an audio file ({Path(path).suffix or 'no extension'}; audio is {audio_names()})"


def is_audio(path: Path) -> bool:
    return path.suffix.lower() in AUDIO_EXTENSIONS


def path_ids(paths: list[PurePosixPath]) -> list[str]:
    """Clip ids of relative paths: the path without extension, or with it where two files
    differ only by extension (`x.wav` beside `x.flac`). Paths must be distinct."""
    ids = [p.with_suffix("").as_posix() if p.suffix else p.as_posix() for p in paths]
    while True:
        counts = Counter(ids)
        clashing = [i for i, clip_id in enumerate(ids) if counts[clip_id] > 1]
        changed = False
        for i in clashing:
            if ids[i] != paths[i].as_posix():
                ids[i] = paths[i].as_posix()
                changed = True
        if not changed:
            return ids


def audio_names() -> str:
    """The audio extensions, for messages."""
    return " ".join(sorted(AUDIO_EXTENSIONS))


def header_duration(path: Path) -> float | None:
    """Seconds of audio as the header declares them; None when the header is unreadable."""
    try:
        info = sf.info(str(path))
    except (sf.SoundFileError, RuntimeError, ValueError):
        return None
    return info.frames / info.samplerate if info.samplerate > 0 else None


def find_audio(root: Path) -> list[Path]:
    """Audio files under `root`, any depth, sorted so manifests are reproducible."""
    return [p for p in find_files(root) if is_audio(p)]


def find_files(root: Path) -> list[Path]:
    """Every file under `root`, any depth, sorted so manifests are reproducible."""
    return sorted(p for p in root.rglob("*") if p.is_file())


def require(path: Path, what: str) -> Path:
    """`path` if it exists, else a FileNotFoundError saying which corpus file is missing."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: {what} not found")
    return path


def write_manifest(records: list[dict], out_dir: Path) -> Path:
    """Write `out_dir/manifest.jsonl`; ids must be unique (they become shard keys)."""
    check_unique_ids(records, "manifest")
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
            missing = set(REQUIRED_FIELDS) - record.keys()
            if missing:
                raise ValueError(f"{path}:{line_no}: missing fields {sorted(missing)}")
            records.append(record)
    check_unique_ids(records, str(path))
    return records


def check_unique_ids(records: list[dict], where: str) -> None:
    """Ids name samples (their keys), so two records with one id would lose a clip."""
    counts = Counter(r["id"] for r in records)
    duplicates = [clip_id for clip_id, n in counts.items() if n > 1]
    if duplicates:
        raise ValueError(f"duplicate clip ids in {where}, e.g. {duplicates[:3]}")


def finish(records: list[dict], out_dir: Path, classes: list[tuple[str, str]] | None) -> Path:
    """Write the manifest and (for labelled corpora) labels.csv; return the manifest path."""
    if classes is not None:
        write_labels(classes, out_dir)
    return write_manifest(records, out_dir)


def iter_split_counts(records: list[dict]) -> Iterator[tuple[str, int]]:
    """(split, clips) in first-seen order, for the summary lines the CLI prints."""
    yield from Counter(r["split"] for r in records).items()
