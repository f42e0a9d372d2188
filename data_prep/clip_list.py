"""A user's own list of clips: `ssamba shard --corpus manifest --src clips.csv|clips.jsonl`.

A CSV file with a header row, or JSON Lines (one object a line), with these columns/fields:

    path      the audio file (required); a relative path resolves against the list's folder
    label     one label, or
    labels    several: in CSV one cell separated by ";" (`dog;bark`), in JSONL a list;
              empty or absent: the clip has no label
    split     train (default), valid (also `val`, `validation`), test, or all (a corpus
              evaluated by cross-validation, with `fold`)
    fold      a whole number (optional)
    speaker   (optional)
    id        the clip's id (optional; default: `path` relative to the list's folder,
              without its extension, or with it where two files differ only by extension)

Any other column is kept in every sample's json (`mic` -> `"mic": "close"`). `duration`
is ignored (the file header's is used); `source`, `sample_rate` and `reject` are reserved.
labels.csv lists the labels found, sorted. Every row is checked before anything is
written; a bad one fails with `<list>:<line>: <what is wrong>`. A listed file that is
missing or does not decode is not an error here: the shard writer rejects it with its
reason in rejects.jsonl.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from data_prep.manifest import SPLIT_NAMES, clip_record, finish, path_ids

LIST_SPLITS = {**SPLIT_NAMES, "all": "all"}
RESERVED = ("source", "sample_rate", "reject")
IGNORED = ("duration",)
CSV_LABEL_SEPARATOR = ";"


def prepare_manifest(src: Path, out_dir: Path) -> Path:
    src = Path(src)
    if src.is_dir():
        raise ValueError(f"{src}: --corpus manifest takes a .csv or .jsonl clip list, not a folder")
    if not src.is_file():
        raise FileNotFoundError(f"{src}: clip list not found")
    suffix = src.suffix.lower()
    if suffix == ".csv":
        rows = _csv_rows(src)
    elif suffix == ".jsonl":
        rows = _jsonl_rows(src)
    else:
        raise ValueError(f"{src}: a clip list is a .csv or .jsonl file")
    base = Path(os.path.normpath(src.resolve().parent))
    clips = [(line, _clip(row, f"{src}:{line}", base)) for line, row in rows]
    if not clips:
        raise ValueError(f"{src}: lists no clips")
    _check_distinct(src, clips, "path", "listed", "path {!r} is already listed on line {}")
    derived = path_ids([_relative(clip["path"], base) for _, clip in clips])
    for (_, clip), clip_id in zip(clips, derived, strict=True):
        clip.setdefault("id", clip_id)
    _check_distinct(src, clips, "id", "id", "clip id {!r} is already used on line {}")
    records = [
        clip_record(
            c["id"],
            c["path"],
            c["labels"],
            c["split"],
            fold=c["fold"],
            speaker=c["speaker"],
            extra=c["extra"],
        )
        for _, c in clips
    ]
    names = sorted({label for r in records for label in r["labels"]})
    return finish(records, Path(out_dir), [(n, n) for n in names] if names else None)


def _csv_rows(src: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with src.open(newline="", encoding="utf-8-sig") as f:  # -sig: lists saved by Excel
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{src}: empty file (a clip list needs a header row with 'path')")
        columns = [name.strip() for name in header]
        _check_columns(columns, f"{src}:1", "column")
        for cells in reader:
            where = f"{src}:{reader.line_num}"
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(columns):
                raise ValueError(f"{where}: {len(cells)} cells, the header has {len(columns)}")
            row: dict[str, Any] = dict(zip(columns, cells, strict=True))
            if "labels" in row:
                row["labels"] = row["labels"].split(CSV_LABEL_SEPARATOR)
            yield reader.line_num, row


def _jsonl_rows(src: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with src.open(encoding="utf-8-sig") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{src}:{line_no}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from err
            if not isinstance(row, dict):
                raise ValueError(f"{where}: not a JSON object")
            _check_columns(list(row), where, "field")
            labels = row.get("labels")
            if labels is not None and not (
                isinstance(labels, list) and all(isinstance(x, str) for x in labels)
            ):
                raise ValueError(f"{where}: 'labels' must be a list of strings, got {labels!r}")
            yield line_no, row


def _check_columns(columns: list[str], where: str, kind: str) -> None:
    if "path" not in columns:
        raise ValueError(f"{where}: no 'path' {kind} ({kind}s: {', '.join(columns) or 'none'})")
    if "label" in columns and "labels" in columns:
        raise ValueError(f"{where}: both 'label' and 'labels' {kind}s; use one")
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    if repeated:
        raise ValueError(f"{where}: {kind} {repeated[0]!r} appears twice")
    for name in RESERVED:
        if name in columns:
            raise ValueError(f"{where}: {kind} {name!r} is reserved (the shard writer sets it)")


def _clip(row: dict[str, Any], where: str, base: Path) -> dict[str, Any]:
    """A row checked and normalised: path, labels, split, fold, speaker, id?, extra."""
    path = str(row.pop("path") or "").strip()
    if not path:
        raise ValueError(f"{where}: empty path")
    clip: dict[str, Any] = {"path": os.path.normpath(base / path), "listed": path}
    if "label" in row:
        label = row.pop("label")
        if label is not None and not isinstance(label, str):
            raise ValueError(f"{where}: 'label' must be a string, got {label!r}")
        clip["labels"] = [label.strip()] if label and label.strip() else []
    else:
        clip["labels"] = [x.strip() for x in row.pop("labels", None) or [] if x.strip()]
    split = str(row.pop("split", None) or "train").strip().lower() or "train"
    if split not in LIST_SPLITS:
        known = ", ".join(LIST_SPLITS)
        raise ValueError(f"{where}: split {split!r} is not one of {known}")
    clip["split"] = LIST_SPLITS[split]
    clip["fold"] = _fold(row.pop("fold", None), where)
    speaker = row.pop("speaker", None)
    clip["speaker"] = str(speaker).strip() if speaker not in (None, "") else None
    clip_id = row.pop("id", None)
    if clip_id not in (None, ""):
        clip["id"] = str(clip_id).strip()
    clip["extra"] = {k: v for k, v in row.items() if k not in IGNORED}
    return clip


def _fold(value: Any, where: str) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    raise ValueError(f"{where}: fold {value!r} is not a whole number")


def _relative(path: str, base: Path) -> PurePosixPath:
    """`path` relative to the list's folder, or its full path without the root outside it."""
    full = Path(path)
    try:
        return PurePosixPath(full.relative_to(base).as_posix())
    except ValueError:
        return PurePosixPath(full.relative_to(full.anchor).as_posix())


def _check_distinct(
    src: Path, clips: list[tuple[int, dict[str, Any]]], field: str, shown: str, message: str
) -> None:
    """message.format(the clip's `shown` value, line first seen) for a repeated `field`."""
    first: dict[str, int] = {}
    for line, clip in clips:
        value = clip[field]
        if value in first:
            raise ValueError(f"{src}:{line}: " + message.format(clip[shown], first[value]))
        first[value] = line
