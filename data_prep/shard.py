"""Manifest -> WebDataset tar shards of 16 kHz flac + json, in parallel and resumable.

Output folder:

    <split>-000000.tar ...   samples `<key>.flac` (16 kHz mono PCM16) + `<key>.json`
    index.json               per split: shard file names, clip counts, hours
    rejects.jsonl            {"id", "path", "split", "reason"} per clip that failed
    stats.json               clip count, hours, per-split counts, fbank mean/std,
                             clip-duration quantiles
    manifest.jsonl, labels.csv, plan.json, <shard>.done.json (per-shard summaries)

The format itself (members, keys, json fields, file names) is defined once, in
`ssamba/data/shard_format.py`, which the readers use too.

Every manifest record ends in exactly one shard or in rejects.jsonl; the writer checks
that sum before it reports. Clips are assigned to shards before any decoding (ordered
by a hash of their id within each split, cut by count and/or estimated size), so a re-run
rebuilds the same plan and skips every finished shard: a shard is written to `.tar.tmp`
and renamed only when complete, then its summary `.done.json` (with the tar's size and
member count) is written. On a re-run a shard counts as finished only when its summary
exists and its tar still has that size and that many members (headers only, cheap at any
corpus size); a missing, truncated or altered tar is rewritten, and the run says so.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from data_prep.manifest import read_manifest
from data_prep.parallel import map_unordered
from data_prep.stats import FbankMoments, clip_moments, summarise_stats
from ssamba.audio import AudioError, load_audio
from ssamba.data.shard_format import (
    AUDIO_MEMBER,
    LABELS_NAME,
    MANIFEST_NAME,
    META_MEMBER,
    REJECTS_NAME,
    SAMPLE_RATE,
    check_split_name,
    encode_audio,
    reject_entry,
    sample_key,
    sample_meta,
    shard_file_name,
    write_index,
)
from ssamba.data.shards import ShardError, count_members

# Size estimate used to cut shards by bytes before encoding: PCM16 upper bound.
BYTES_PER_SECOND = SAMPLE_RATE * 2


@dataclass(frozen=True)
class ShardTask:
    """One shard to write: its clips in order, and which of them feed the fbank stats."""

    split: str
    index: int
    records: tuple[dict, ...]
    for_stats: tuple[bool, ...]

    @property
    def file(self) -> str:
        return shard_file_name(self.split, self.index)

    @property
    def name(self) -> str:
        return self.file.removesuffix(".tar")


def plan_shards(
    records: list[dict],
    shard_size: int = 1000,
    shard_mb: float | None = None,
    stats_clips: int = 2000,
) -> list[ShardTask]:
    """Deterministic assignment of clips to shards, independent of decoding results.

    A shard closes at `shard_size` clips or, with `shard_mb`, when the PCM16 size of its
    clips would pass that many MB (flac is ~2x smaller). Every `ceil(N / stats_clips)`-th
    clip (in plan order) is measured for the fbank statistics.
    """
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    by_split: dict[str, list[dict]] = {}
    for record in records:
        by_split.setdefault(record["split"], []).append(record)
    stride = max(1, math.ceil(len(records) / max(1, stats_clips)))
    limit = shard_mb * 1e6 if shard_mb else math.inf
    tasks, position = [], 0
    for split in sorted(by_split):
        check_split_name(split)
        chunk: list[dict] = []
        size = 0.0
        index = 0
        for record in sorted(by_split[split], key=_mixing_order):
            clip_bytes = (record.get("duration") or 0.0) * BYTES_PER_SECOND
            if chunk and (len(chunk) >= shard_size or size + clip_bytes > limit):
                tasks.append(_task(split, index, chunk, position, stride))
                position += len(chunk)
                chunk, size, index = [], 0.0, index + 1
            chunk.append(record)
            size += clip_bytes
        if chunk:
            tasks.append(_task(split, index, chunk, position, stride))
            position += len(chunk)
    return tasks


def _mixing_order(record: dict) -> str:
    """A fixed pseudo-random order: corpora list clips by class or speaker (FSDD by digit,
    Speech Commands by word), and a streaming shuffle buffer only mixes what sits near in
    the stream, so shards written in id order would feed a few classes at a time."""
    return hashlib.sha1(record["id"].encode()).hexdigest()


def write_shards(
    manifest: Path,
    out_dir: Path,
    workers: int = 1,
    shard_size: int = 1000,
    shard_mb: float | None = None,
    stats_clips: int = 2000,
) -> dict:
    """Write (or finish writing) the shards of `manifest` into `out_dir`; returns stats.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = read_manifest(manifest)
    if not records:
        raise ValueError(f"{manifest}: no clips to shard")
    _copy_beside(manifest, out_dir)
    plan = {
        "manifest_clips": len(records),
        "manifest_hash": _manifest_digest(records),
        "shard_size": shard_size,
        "shard_mb": shard_mb,
        "stats_clips": stats_clips,
    }
    _check_plan(out_dir / "plan.json", plan)
    tasks = plan_shards(records, shard_size, shard_mb, stats_clips)
    todo = [t for t in tasks if not _finished(t, out_dir)]
    done_clips = len(records) - sum(len(t.records) for t in todo)
    if done_clips:
        print(f"resuming: {len(tasks) - len(todo)} of {len(tasks)} shards already complete")
    with tqdm(total=len(records), initial=done_clips, unit="clip", desc="shards") as bar:
        jobs = [(task, out_dir) for task in todo]
        for summary in map_unordered(_write_shard_job, jobs, workers):
            bar.update(summary["clips"] + len(summary["rejects"]))
    return _finalise(tasks, out_dir, len(records))


def _write_shard_job(job: tuple[ShardTask, Path]) -> dict:
    return write_shard(*job)


def write_shard(task: ShardTask, out_dir: Path) -> dict:
    """Decode, validate and store the clips of one shard; returns its summary."""
    out_dir = Path(out_dir)
    final = out_dir / task.file
    tmp = out_dir / f"{task.file}.tmp"
    rejects, moments, durations = [], FbankMoments(), []
    seconds, clips = 0.0, 0
    with wds.TarWriter(str(tmp)) as sink:
        for record, measure in zip(task.records, task.for_stats, strict=True):
            if "reject" in record:  # the recipe knows it is no clip (`notes.txt`)
                rejects.append(reject_entry(record, f"{record['path']}: {record['reject']}"))
                continue
            try:
                wave, _ = load_audio(record["path"], SAMPLE_RATE, name=record["path"])
            except AudioError as err:
                rejects.append(reject_entry(record, str(err)))
                continue
            duration = wave.numel() / SAMPLE_RATE
            sink.write(
                {
                    "__key__": sample_key(record["id"]),
                    AUDIO_MEMBER: encode_audio(wave),
                    META_MEMBER: sample_meta(record, duration),
                }
            )
            if measure:
                moments.add(clip_moments(wave, SAMPLE_RATE))
            seconds += duration
            durations.append(round(duration, 4))
            clips += 1
    if clips:
        tmp.rename(final)
    else:
        tmp.unlink()
    summary = {
        "name": task.name,
        "split": task.split,
        "file": final.name if clips else None,
        # what a re-run checks before trusting the tar
        "bytes": final.stat().st_size if clips else 0,
        "members": 2 * clips,
        "clips": clips,
        "seconds": seconds,
        "rejects": rejects,
        "moments": moments.to_dict(),
        "durations": durations,
    }
    summary_tmp = out_dir / f"{task.name}.done.json.tmp"
    summary_tmp.write_text(json.dumps(summary))
    summary_tmp.rename(_summary_path(out_dir, task.name))
    return summary


def _finalise(tasks: list[ShardTask], out_dir: Path, expected: int) -> dict:
    """Merge the per-shard summaries into index.json, rejects.jsonl and stats.json."""
    summaries = [json.loads(_summary_path(out_dir, t.name).read_text()) for t in tasks]
    splits: dict[str, dict] = {}
    moments = FbankMoments()
    # None once a summary predates the durations (a shard done by an older writer)
    durations: list[float] | None = []
    rejects_path = out_dir / REJECTS_NAME
    with rejects_path.open("w") as f:
        for summary in summaries:
            split = splits.setdefault(summary["split"], {"shards": [], "clips": 0, "hours": 0.0})
            if summary["file"]:
                split["shards"].append({"file": summary["file"], "clips": summary["clips"]})
            split["clips"] += summary["clips"]
            split["hours"] += summary["seconds"] / 3600
            moments.add(FbankMoments.from_dict(summary["moments"]))
            if durations is not None and "durations" in summary:
                durations += summary["durations"]
            else:
                durations = None
            for reject in summary["rejects"]:
                f.write(json.dumps(reject) + "\n")
    clips = sum(s["clips"] for s in summaries)
    rejects = sum(len(s["rejects"]) for s in summaries)
    if clips + rejects != expected:
        raise RuntimeError(
            f"{out_dir}: {clips} clips + {rejects} rejects != {expected} in manifest"
        )
    if not clips:
        raise ValueError(f"all {rejects} clips were rejected; reasons in {rejects_path}")
    index = write_index(out_dir, splits)
    stats = summarise_stats(out_dir, index, moments, rejects, durations)
    per_split = ", ".join(f"{name} {s['clips']}" for name, s in splits.items())
    print(
        f"{clips} clips ({stats['hours']:.2f} h) in {sum(len(s['shards']) for s in splits.values())} "
        f"shards [{per_split}]; {rejects} rejected (see {rejects_path})"
    )
    return stats


def _task(split: str, index: int, chunk: list[dict], start: int, stride: int) -> ShardTask:
    flags = tuple((start + i) % stride == 0 for i in range(len(chunk)))
    return ShardTask(split, index, tuple(chunk), flags)


def _finished(task: ShardTask, out_dir: Path) -> bool:
    """Whether `task` was written and its tar is still whole; says why a tar is redone."""
    summary_path = _summary_path(out_dir, task.name)
    try:
        summary = json.loads(summary_path.read_text())
    except FileNotFoundError:
        return False
    except ValueError:  # a summary cut short: the shard's end was never recorded
        summary_path.unlink()
        return False
    damage = _damage(out_dir, summary)
    if damage:
        print(f"{task.file} {damage}: rewriting it")
        summary_path.unlink()
        return False
    return True


def _damage(out_dir: Path, summary: dict) -> str | None:
    """What is wrong with a finished shard's tar, judged by its size and member count."""
    if not summary["file"]:
        return None  # every clip of the shard was rejected: there is no tar
    path = out_dir / summary["file"]
    if not path.is_file():
        return "is missing"
    size = path.stat().st_size
    if "bytes" in summary and size != summary["bytes"]:
        return f"holds {size} bytes, {summary['bytes']} were written"
    try:
        members = count_members(path)
    except ShardError as err:
        return f"is unreadable ({err})"
    expected = summary.get("members", 2 * summary["clips"])
    if members != expected:
        return f"holds {members} members, {expected} were written"
    return None


def _summary_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.done.json"


def _manifest_digest(records: list[dict]) -> str:
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r["id"]):
        # durations decide cuts by size, so they are part of the plan too
        digest.update(f"{record['split']}\t{record['id']}\t{record.get('duration')}\n".encode())
    return digest.hexdigest()[:16]


def _check_plan(path: Path, plan: dict) -> None:
    """Resuming is only sound with the same clips and shard settings."""
    if path.exists():
        previous = json.loads(path.read_text())
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise ValueError(
                f"{path.parent}: holds shards of a different plan (changed: {', '.join(changed)}); "
                "use a fresh --out folder or delete it"
            )
    else:
        path.write_text(json.dumps(plan, indent=1))


def _copy_beside(manifest: Path, out_dir: Path) -> None:
    """Keep manifest and labels.csv with the shards, so the folder is self-describing."""
    manifest = Path(manifest)
    for name, source in ((MANIFEST_NAME, manifest), (LABELS_NAME, manifest.parent / LABELS_NAME)):
        target = out_dir / name
        if source.exists() and source.resolve() != target.resolve():
            shutil.copyfile(source, target)
