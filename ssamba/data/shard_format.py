"""The on-disk shard format: the one definition the shard writer and every reader share.

A shard folder holds:

    <split>-NNNNNN.tar  WebDataset tars; a sample is two members, `<key>.flac`
                        (16 kHz mono PCM16) and `<key>.json` (see `sample_meta`)
    index.json          {"sample_rate", "clips", "splits": {split: {"shards": [{"file",
                        "clips"}], "clips", "hours"}}}
    stats.json          {"clips", "hours", "splits", "rejects", "fbank_mean", "fbank_std",
                        "fbank_clips", "fbank", "durations": {"p10", "p50", "p90", "p95",
                        "max" (seconds), "clips"}}
    labels.csv          index,id,name: the class order of label vectors (labelled corpora)
    rejects.jsonl       {"id", "path", "split", "reason"} per input that is in no shard
    manifest.jsonl      the clip list the shards were written from

Readers also take audio members of any other extension soundfile decodes (`.wav`, ...),
so hand-made tars work too.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import torch

from ssamba.audio import AUDIO_EXTENSIONS
from ssamba.files import atomic_write_text

SAMPLE_RATE = 16000
AUDIO_MEMBER = "flac"
META_MEMBER = "json"
# member extensions a reader takes as the clip's audio (WebDataset extensions have no dot)
AUDIO_MEMBERS = frozenset(ext.lstrip(".") for ext in AUDIO_EXTENSIONS)

INDEX_NAME = "index.json"
STATS_NAME = "stats.json"
LABELS_NAME = "labels.csv"
REJECTS_NAME = "rejects.jsonl"
MANIFEST_NAME = "manifest.jsonl"

SHARD_GLOB = "*-*.tar"
_SHARD_FILE = re.compile(r"(?P<split>[\w\-]+)-(?P<index>\d+)\.tar")
_SPLIT_NAME = re.compile(r"[\w\-]+")


def shard_file_name(split: str, index: int) -> str:
    """`<split>-NNNNNN.tar`, e.g. `train-000012.tar`."""
    check_split_name(split)
    return f"{split}-{index:06d}.tar"


def shard_split(file_name: str) -> str | None:
    """The split a shard file name belongs to; None when the name is not a shard's."""
    match = _SHARD_FILE.fullmatch(file_name)
    return match["split"] if match else None


def check_split_name(split: str) -> None:
    if not _SPLIT_NAME.fullmatch(split):
        raise ValueError(
            f"split name {split!r} must be letters, digits, '_' or '-' (it names shards)"
        )


# ------------------------------------------------------------------ samples

_KEY_LITERAL = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-/")


def sample_key(clip_id: str) -> str:
    """The tar key of a clip: distinct ids always give distinct keys, and keys hold no dot.

    WebDataset splits key and extension at the first dot of a member name, so every
    character other than ASCII letters, digits, `_`, `-` and `/` is written `~xx` per
    UTF-8 byte (`~` itself too, which makes the escape reversible): `a.b` -> `a~2eb`,
    `a b` -> `a~20b`. A `/` that would start, end or double a path is escaped as well.
    Plain ids (`4_lucas_3`, `yes/0b09edd3_nohash_1`) are their own key.
    """
    out = []
    last = len(clip_id) - 1
    for i, char in enumerate(clip_id):
        bad_slash = char == "/" and (i in (0, last) or clip_id[i - 1] == "/")
        if char in _KEY_LITERAL and not bad_slash:
            out.append(char)
        else:
            out.extend(f"~{byte:02x}" for byte in char.encode())
    return "".join(out)


def split_member_name(name: str) -> tuple[str, str] | None:
    """(key, extension) of a tar member: WebDataset cuts at the first dot of the basename."""
    directory, _, base = name.rpartition("/")
    if "." not in base:
        return None
    stem, ext = base.split(".", 1)
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def sample_meta(record: dict[str, Any], duration: float) -> dict[str, Any]:
    """A sample's json from its manifest record and its decoded duration in seconds:

    {"id", "labels", "duration", "source" (the input path), "split", "sample_rate"},
    then every other field of the record (`fold`, `speaker`, a clip list's own columns).
    """
    meta = {
        "id": record["id"],
        "labels": record["labels"],
        "duration": duration,
        "source": record["path"],
        "split": record["split"],
        "sample_rate": SAMPLE_RATE,
    }
    meta.update({k: v for k, v in record.items() if k not in meta and k != "path"})
    return meta


def encode_audio(wave: torch.Tensor) -> bytes:
    """wave: (samples,) float in [-1, 1] at 16 kHz -> PCM16 flac bytes (clipped, not wrapped)."""
    pcm = np.clip(np.round(wave.numpy() * 32768.0), -32768, 32767).astype(np.int16)
    buffer = io.BytesIO()
    sf.write(buffer, pcm, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


# Limits on a sample's json as read: generous for any real clip (a few hundred bytes, two
# levels), small enough that a crafted member cannot exhaust memory or the recursion limit.
META_MAX_BYTES = 1 << 20
META_MAX_DEPTH = 8


class BadMeta(ValueError):
    """A sample json that fails `parse_sample_meta`; the message says which field and why."""


def parse_sample_meta(data: bytes) -> dict[str, Any]:
    """A sample's json member -> its metadata, validated field by field, or BadMeta.

    Checked: size (`META_MAX_BYTES`), nesting depth (`META_MAX_DEPTH`, measured before
    parsing so a deep document cannot reach the recursion limit), an object at the top,
    `labels` a string or a list of strings (a string is read as one label), `id` and
    `split` strings or numbers, `fold` an integer, `duration` a number. Other fields pass
    as they are.
    """
    if len(data) > META_MAX_BYTES:
        raise BadMeta(f"{len(data)} bytes, more than {META_MAX_BYTES}")
    depth = _json_depth(data)
    if depth > META_MAX_DEPTH:
        raise BadMeta(f"nested {depth} levels deep, more than {META_MAX_DEPTH}")
    try:
        meta = json.loads(data)
    except (ValueError, UnicodeDecodeError) as err:
        raise BadMeta(f"not JSON ({err})") from None
    if not isinstance(meta, dict):
        raise BadMeta(f"a JSON {type(meta).__name__}, not an object")
    labels = meta.get("labels", [])
    if isinstance(labels, str):
        labels = [labels]
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise BadMeta(f"labels {_short(labels)}: not a string or a list of strings")
    meta["labels"] = labels
    for key, kinds in (("id", (str, int)), ("split", (str, int)), ("duration", (int, float))):
        if key in meta and (isinstance(meta[key], bool) or not isinstance(meta[key], kinds)):
            raise BadMeta(
                f"{key} {_short(meta[key])}: not a {' or '.join(k.__name__ for k in kinds)}"
            )
    if "fold" in meta:
        try:
            meta["fold"] = int(str(meta["fold"]))
        except ValueError:
            raise BadMeta(f"fold {_short(meta['fold'])}: not an integer") from None
    return meta


def _json_depth(data: bytes) -> int:
    """Deepest bracket nesting of a JSON text, outside strings; no parsing, no recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in data:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # closing quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            deepest = max(deepest, depth)
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return deepest


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def reject_entry(record: dict[str, Any], reason: str) -> dict[str, Any]:
    """One line of rejects.jsonl."""
    return {"id": record["id"], "path": record["path"], "split": record["split"], "reason": reason}


# ------------------------------------------------------------------ folder files


def write_labels(classes: list[tuple[str, str]], folder: Path) -> Path:
    """`labels.csv` (index,id,name); classes: (id, display name) in index order."""
    text = io.StringIO(newline="")
    writer = csv.writer(text)
    writer.writerow(["index", "id", "name"])
    for index, (class_id, name) in enumerate(classes):
        writer.writerow([index, class_id, name])
    return atomic_write_text(Path(folder) / LABELS_NAME, text.getvalue())


def read_labels(path: Path) -> list[tuple[str, str]]:
    """(id, name) in index order from a `labels.csv`."""
    with Path(path).open(newline="") as f:
        rows = sorted(csv.DictReader(f), key=lambda row: int(row["index"]))
    return [(row["id"], row["name"]) for row in rows]


def write_index(folder: Path, splits: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """index.json; splits: {split: {"shards": [{"file", "clips"}], "clips", "hours"}}."""
    index = {
        "sample_rate": SAMPLE_RATE,
        "clips": sum(s["clips"] for s in splits.values()),
        "splits": splits,
    }
    atomic_write_text(Path(folder) / INDEX_NAME, json.dumps(index, indent=1))
    return index


def read_index(folder: Path) -> dict[str, list[tuple[str, int]]] | None:
    """{split: [(shard file name, clips)]} from index.json; None when there is none."""
    path = Path(folder) / INDEX_NAME
    if not path.is_file():
        return None
    try:
        splits = json.loads(path.read_text())["splits"]
        return {
            split: [(str(entry["file"]), int(entry["clips"])) for entry in info["shards"]]
            for split, info in splits.items()
        }
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a shard index ({type(err).__name__}: {err})") from err


def write_stats(folder: Path, stats: dict[str, Any]) -> None:
    """stats.json, written atomically as every file of the folder a reader trusts."""
    atomic_write_text(Path(folder) / STATS_NAME, json.dumps(stats, indent=1))


def require_shard_folder(folder: str | Path) -> Path:
    """`folder` as a Path; FileNotFoundError saying to shard first when it does not exist."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(
            f"shard folder {root} does not exist: shard the audio first (`ssamba shard "
            f"--corpus CORPUS --src FOLDER --out {root}`, or `make shards CORPUS=...`)"
        )
    return root


def read_stats(folder: Path) -> dict[str, Any]:
    path = require_shard_folder(folder) / STATS_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{path} not found: run `make stats SHARDS={folder}`") from err
    except ValueError as err:
        raise ValueError(f"{path}: not JSON ({err})") from err


def duration_quantile(folder: Path, quantile: str) -> float:
    """A quantile ("p90", ...) of the clip durations in seconds the shard writer recorded."""
    durations = read_stats(folder).get("durations")
    if not isinstance(durations, dict) or quantile not in durations:
        raise ValueError(
            f"{Path(folder) / STATS_NAME} has no clip durations (written before they were "
            f"recorded): re-run `make stats SHARDS={folder}`, or give target_length in frames"
        )
    return float(durations[quantile])


def fbank_stats(folder: Path) -> tuple[float, float]:
    """(fbank mean, fbank std) the shard writer measured for a shard folder."""
    stats = read_stats(folder)
    try:
        return float(stats["fbank_mean"]), float(stats["fbank_std"])
    except (KeyError, TypeError, ValueError) as err:
        path = Path(folder) / STATS_NAME
        raise ValueError(f"{path}: no usable fbank_mean/fbank_std ({err})") from err
