"""Read WebDataset shards written by the shard writer: find them, scan them, stream them, decode clips.

The folder layout and sample format (`<split>-NNNNNN.tar` of `<key>.flac` + `<key>.json`,
index.json, stats.json, labels.csv) are defined once, in `shard_format.py`.

Two ways in, one per use:
- `iter_shard` streams a tar front to back (pretraining: sequential reads of huge corpora);
- `scan_shard` records each clip's offset and metadata once, then `ClipReader` seeks straight
  to any clip (finite evaluation and labelled training: exact partitions, true shuffles).

Bad clips never crash a run and are never lost silently: `decode_clip` raises `CorruptClip`
with a reason, and `SkipCounter` counts it per worker in shared memory (so the main process
and the training task can read the totals) and logs it.
"""

from __future__ import annotations

import logging
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ssamba.audio import AudioError, load_audio
from ssamba.data.shard_format import (
    AUDIO_MEMBERS,
    INDEX_NAME,
    META_MEMBER,
    SAMPLE_RATE,
    SHARD_GLOB,
    BadMeta,
    parse_sample_meta,
    read_index,
    require_shard_folder,
    shard_split,
    split_member_name,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shard:
    """One tar file of a split and how many clips it holds (None when not indexed)."""

    path: str
    split: str
    count: int | None


def list_shards(folder: str | Path, splits: Sequence[str] | None = None) -> list[Shard]:
    """The shards of `splits` (all when None) in `folder`, in name order.

    Reads the index written by the shard writer when present (it carries clip counts), else globs
    `<split>-*.tar`. Raises FileNotFoundError / ValueError naming the folder and the splits
    that do exist, so a typo fails before training starts.
    """
    root = require_shard_folder(folder)
    shards = _indexed_shards(root) or _globbed_shards(root)
    if not shards:
        raise ValueError(f"shard folder {root} holds no <split>-NNNNNN.tar files")
    if splits is None:
        return shards
    chosen = [s for s in shards if s.split in set(splits)]
    missing = sorted(set(splits) - {s.split for s in chosen})
    if missing:
        known = sorted({s.split for s in shards})
        raise ValueError(f"{root}: no shards for split(s) {missing}; splits present: {known}")
    return chosen


def _indexed_shards(root: Path) -> list[Shard]:
    """Shards listed in the folder's index.json, with their clip counts."""
    index = read_index(root)
    if index is None:
        return []
    shards = [
        Shard(str(root / file), split, clips)
        for split, entries in index.items()
        for file, clips in entries
    ]
    for shard in shards:
        if not Path(shard.path).is_file():
            raise FileNotFoundError(f"{root / INDEX_NAME} lists {shard.path}, which does not exist")
    return sorted(shards, key=lambda s: s.path)


def _globbed_shards(root: Path) -> list[Shard]:
    found = ((path, shard_split(path.name)) for path in sorted(root.glob(SHARD_GLOB)))
    return [Shard(str(path), split, None) for path, split in found if split is not None]


@dataclass
class RawClip:
    """One sample as stored: its key, shard, audio bytes and parsed json (None if absent/bad,
    with `meta_error` saying why it was refused)."""

    key: str
    shard: str
    audio: bytes | None = None
    meta: dict[str, Any] | None = None
    meta_error: str | None = None


@dataclass
class ClipRef:
    """Where a clip's audio sits inside its tar, plus its parsed metadata (`meta`)."""

    key: str
    shard: str
    audio_offset: int
    audio_size: int
    meta: dict[str, Any] = field(default_factory=dict)


def clip_id(clip: ClipRef) -> str:
    """A catalogued clip's id: its json `id`, else its key in the tar (as `decode_clip`)."""
    return str(clip.meta.get("id", clip.key))


class ShardError(RuntimeError):
    """A tar file that cannot be read (missing, truncated, compressed, not a tar)."""


def _open_tar(path: str) -> tarfile.TarFile:
    try:
        # "r:" is plain tar with random access: skipping a member is a seek, not a read.
        return tarfile.open(path, mode="r:")
    except (OSError, tarfile.TarError) as err:
        raise ShardError(f"{path}: cannot open as an uncompressed tar ({err})") from err


def _members(path: str) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo, str, str]]:
    """(tar, member, key, ext) for every regular file; ShardError if the tar breaks midway."""
    last = "<start>"
    with _open_tar(path) as tar:
        try:
            for member in tar:
                last = member.name
                parts = split_member_name(member.name) if member.isreg() else None
                if parts is not None:
                    yield tar, member, *parts
        except (OSError, tarfile.TarError, EOFError) as err:
            raise ShardError(f"{path}: unreadable after member {last!r} ({err})") from err


def count_members(path: str | Path) -> int:
    """Sample members (`<key>.<ext>` files) of a tar, from its headers alone; ShardError if
    the tar is missing or breaks. The shard writer checks finished shards with it."""
    return sum(1 for _ in _members(str(path)))


def iter_shard(path: str) -> Iterator[RawClip]:
    """Stream the clips of one tar in order (members of a key are adjacent in WebDataset tars)."""
    clip: RawClip | None = None
    for tar, member, key, ext in _members(path):
        if clip is None or key != clip.key:
            if clip is not None:
                yield clip
            clip = RawClip(key, path)
        if ext in AUDIO_MEMBERS or ext == META_MEMBER:
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            if ext == META_MEMBER:
                clip.meta, clip.meta_error = _parse_meta(data)
            else:
                clip.audio = data
    if clip is not None:
        yield clip


def scan_shard(path: str) -> tuple[list[ClipRef], list[RawClip], ShardError | None]:
    """Offsets and metadata of every clip of one tar, reading only headers and json.

    Returns (clips, broken, error): `broken` are samples without audio or with unparsable
    json; `error` says why the tar stopped early (the clips before the break are kept).
    """
    refs: dict[str, ClipRef] = {}
    metas: dict[str, tuple[dict[str, Any] | None, str | None]] = {}
    order: list[str] = []
    error = None
    try:
        for tar, member, key, ext in _members(path):
            if key not in refs and key not in metas:
                order.append(key)
            if ext in AUDIO_MEMBERS:
                refs[key] = ClipRef(key, path, member.offset_data, member.size)
            elif ext == META_MEMBER:
                metas[key] = _parse_meta(tar.extractfile(member).read())  # type: ignore[union-attr]
    except ShardError as err:
        error = err
    clips, broken = [], []
    for key in order:
        ref, (meta, meta_error) = refs.get(key), metas.get(key, (None, None))
        if ref is None or meta is None:
            broken.append(RawClip(key, path, None if ref is None else b"", meta, meta_error))
            continue
        ref.meta = meta
        clips.append(ref)
    return clips, broken, error


def _parse_meta(data: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """(metadata, None), or (None, why the json was refused)."""
    try:
        return parse_sample_meta(data), None
    except BadMeta as err:
        return None, str(err)


class ClipReader:
    """Reads clips by offset, keeping one open file per shard (per worker process)."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def read(self, ref: ClipRef) -> RawClip:
        handle = self._files.get(ref.shard)
        if handle is None:
            handle = self._files[ref.shard] = open(ref.shard, "rb")  # noqa: SIM115 (cached)
        handle.seek(ref.audio_offset)
        audio = handle.read(ref.audio_size)
        return RawClip(ref.key, ref.shard, audio, dict(ref.meta))

    def close(self) -> None:
        for handle in self._files.values():
            handle.close()
        self._files.clear()


class CorruptClip(Exception):
    """A clip to skip: `reason` is one of `SKIP_REASONS`, the message names the clip."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


SKIP_REASONS = ("undecodable", "empty", "non_finite", "silent", "bad_metadata", "bad_shard")


def decode_clip(raw: RawClip) -> tuple[torch.Tensor, dict[str, Any]]:
    """raw -> (wave: (samples,) float32 at 16 kHz, metadata), or CorruptClip with a reason."""
    name = f"{Path(raw.shard).name}:{raw.key}"
    if raw.audio is None:
        raise CorruptClip(
            "bad_metadata", f"{name}: no audio member ({'/'.join(sorted(AUDIO_MEMBERS))})"
        )
    meta = raw.meta
    if meta is None and raw.meta_error is not None:
        raise CorruptClip("bad_metadata", f"{name}: .json refused: {raw.meta_error}")
    if meta is None:
        raise CorruptClip("bad_metadata", f"{name}: missing or unparsable .json")
    try:
        wave, _ = load_audio(raw.audio, target_sr=SAMPLE_RATE, name=name)
    except AudioError as err:
        raise CorruptClip(_audio_error_reason(str(err)), str(err)) from err
    meta.setdefault("id", raw.key)
    return wave, meta


def _audio_error_reason(message: str) -> str:
    if "NaN" in message or "infinite" in message:
        return "non_finite"
    if "silent" in message:
        return "silent"
    if "empty" in message or "no audio samples" in message or "shorter than" in message:
        return "empty"
    return "undecodable"


class SkipCounter:
    """Skipped clips per reason, per worker, in shared memory.

    DataLoader workers are separate processes, so a Python counter there is invisible to
    the trainer. Each worker increments its own row of a shared tensor (no races); any
    process holding this object reads the totals. Every skip is logged (the first
    `log_first` per worker individually, then one summary line every `log_every`).
    """

    def __init__(self, slots: int, log_first: int = 10, log_every: int = 100) -> None:
        self.counts = torch.zeros(max(slots, 1), len(SKIP_REASONS), dtype=torch.int64)
        self.counts.share_memory_()
        self.log_first = log_first
        self.log_every = log_every

    def add(self, slot: int, error: CorruptClip) -> None:
        row = self.counts[slot]
        row[SKIP_REASONS.index(error.reason)] += 1
        seen = int(row.sum())
        if seen <= self.log_first:
            log.warning("skipped clip (%s): %s", error.reason, error)
        elif seen % self.log_every == 0:
            summary = ", ".join(
                f"{r}={int(n)}" for r, n in zip(SKIP_REASONS, row.tolist(), strict=True) if n
            )
            log.warning("worker %d has skipped %d clips so far: %s", slot, seen, summary)

    def totals(self) -> dict[str, int]:
        """Skipped clips per reason, summed over workers (this process's view of this rank)."""
        return {
            reason: int(n)
            for reason, n in zip(SKIP_REASONS, self.counts.sum(0).tolist(), strict=True)
        }


def catalogue(shards: Sequence[Shard], counter: SkipCounter) -> list[ClipRef]:
    """Every clip of `shards` with offset and metadata, in shard order (one scan, no decode).

    Samples without audio or with bad json, and tars that break, are counted in `counter`
    (row 0: the main process) and logged; the clips before a break are kept.
    """
    clips: list[ClipRef] = []
    for shard in shards:
        found, broken, error = scan_shard(shard.path)
        if error is not None:
            counter.add(0, CorruptClip("bad_shard", str(error)))
        clips.extend(found)
        for raw in broken:
            try:
                decode_clip(raw)
            except CorruptClip as err:
                counter.add(0, err)
    return clips
