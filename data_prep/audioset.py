"""AudioSet from a local folder of downloaded clips plus the official segment CSVs.

Official CSVs (in `src` or any sub-folder): `balanced_train_segments.csv`,
`unbalanced_train_segments.csv`, `eval_segments.csv` - `#` comment lines, then
`YTID, start_seconds, end_seconds, "mid1,mid2"` - and `class_labels_indices.csv`
(`index,mid,display_name`, 527 classes). Splits are named after the CSVs
(`balanced_train`, `unbalanced_train`, `eval`).

Clips are matched to rows by YouTube id: a file stem may be the bare 11-character id,
`Y<id>` (the common download naming) or `<id>_<start>...`. Rows whose clip is not on
disk (videos vanish from YouTube) are counted and printed, not silently dropped.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep.manifest import clip_record, find_audio, finish

SEGMENT_CSVS = {
    "balanced_train": "balanced_train_segments.csv",
    "unbalanced_train": "unbalanced_train_segments.csv",
    "eval": "eval_segments.csv",
}
YTID_LENGTH = 11


def prepare_audioset(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    classes = _read_classes(_find(src_dir, "class_labels_indices.csv"))
    known = {mid for mid, _ in classes}
    clips = _clips_by_ytid(src_dir)
    records, missing = [], {}
    csvs = {split: _find(src_dir, name, required=False) for split, name in SEGMENT_CSVS.items()}
    if not any(csvs.values()):
        raise FileNotFoundError(f"{src_dir}: none of {sorted(SEGMENT_CSVS.values())} found")
    for split, csv_path in csvs.items():
        if csv_path is None:
            continue
        missing[split] = 0
        for ytid, labels in _read_segments(csv_path):
            unknown = set(labels) - known
            if unknown:
                raise ValueError(
                    f"{csv_path}: {ytid} has labels {sorted(unknown)} not in class_labels_indices.csv"
                )
            path = clips.get(ytid)
            if path is None:
                missing[split] += 1
                continue
            records.append(clip_record(ytid, path, labels, split))
    for split, n in missing.items():
        if n:
            print(f"audioset: {n} {split} segments have no local clip (not downloaded)")
    return finish(records, Path(out_dir), classes)


def _find(root: Path, name: str, required: bool = True) -> Path | None:
    hits = sorted(root.rglob(name))
    if not hits and required:
        raise FileNotFoundError(f"{root}: {name} not found (official AudioSet metadata)")
    return hits[0] if hits else None


def _read_classes(path: Path) -> list[tuple[str, str]]:
    with path.open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["index"]))
    return [(row["mid"], row["display_name"]) for row in rows]


def _read_segments(path: Path) -> list[tuple[str, list[str]]]:
    rows = []
    with path.open(newline="") as f:
        for line_no, row in enumerate(csv.reader(f, skipinitialspace=True), 1):
            if not row or row[0].startswith("#"):
                continue
            if len(row) != 4:
                raise ValueError(f"{path}:{line_no}: expected YTID, start, end, labels; got {row}")
            rows.append((row[0], [mid for mid in row[3].split(",") if mid]))
    return rows


def _clips_by_ytid(root: Path) -> dict[str, Path]:
    """Every plausible YouTube id of every clip -> clip; rows look up their exact id.

    `Y<id>...` and `<id>...` are both registered, so a real id that starts with "Y"
    is found either way; a wrong candidate is never looked up by a real row.
    """
    clips: dict[str, Path] = {}
    for path in find_audio(root):
        stem = path.stem
        clips.setdefault(stem[:YTID_LENGTH], path)
        if stem.startswith("Y") and len(stem) > YTID_LENGTH:
            clips.setdefault(stem[1 : 1 + YTID_LENGTH], path)
    return clips
