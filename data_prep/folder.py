"""Any folder of audio, labelled by sub-folder or not, split by top-level folders or not.

    src/<label>/**/clip.wav                 every clip in split "train", label = <label>
    src/<split>/<label>/**/clip.wav         split from a top-level train/, valid/ (or val/,
                                            validation/) and test/ folder, label below it

A clip directly in `src` has no label. A clip directly in a split folder (`train/x.wav`)
has none either and is rejected, named in one line, when other clips have labels: a
labelled set cannot train on it, and it would fail later. `prepare_unlabelled` gives no
labels at all. Every format in `ssamba.audio.AUDIO_EXTENSIONS` is taken. Any other
file is listed for the shard writer to reject ("not an audio file"), as is a file outside
the split folders when `src` has them, so nothing in the folder goes unaccounted for.

Clip ids are the paths relative to `src` without extension (`dog/a`), so equal file names
in different sub-folders stay distinct; two audio files that differ only in extension keep
it (`dog/x.wav`, `dog/x.flac`), as does every file that is not audio (`dog/x.txt`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from data_prep.manifest import (
    SPLIT_NAMES,
    audio_names,
    clip_record,
    find_files,
    finish,
    is_audio,
    not_audio_reason,
    path_ids,
    rejected_record,
)


def prepare_folder(src_dir: Path, out_dir: Path, labels_from_subfolders: bool = True) -> Path:
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: audio folder not found")
    files = find_files(src_dir)
    rels = [PurePosixPath(p.relative_to(src_dir).as_posix()) for p in files]
    by_split = _has_split_folders(src_dir)
    # ids from the audio files alone, so `take.txt` beside `take.wav` leaves its id `take`
    audio = [rel for path, rel in zip(files, rels, strict=True) if is_audio(path)]
    ids = dict(zip(audio, path_ids(audio), strict=True))
    records, outside, unlabelled = [], 0, []
    for path, rel in zip(files, rels, strict=True):
        clip_id = ids.get(rel, rel.as_posix())
        split, inner = _split_of(rel) if by_split else ("train", rel.parts)
        if not is_audio(path):
            records.append(rejected_record(clip_id, path, split or "train", not_audio_reason(path)))
        elif split is None:
            outside += 1
            reason = f"not inside a split folder ({_split_folders()})"
            records.append(rejected_record(clip_id, path, "train", reason))
        else:
            labels = [inner[0]] if labels_from_subfolders and len(inner) > 1 else []
            records.append(clip_record(clip_id, path, labels, split))
            if by_split and labels_from_subfolders and not labels:
                unlabelled.append(len(records) - 1)
    if unlabelled and any(r.get("labels") for r in records):
        for i in unlabelled:
            record = records[i]
            folder = PurePosixPath(record["path"]).parent.name
            reason = f"directly in the split folder {folder}/, not in a label folder below it"
            print(f"{record['path']}: {reason}; not sharded")
            records[i] = rejected_record(
                record["id"], Path(record["path"]), record["split"], reason
            )
    rejected = sum("reject" in r for r in records)
    if rejected == len(records):
        raise ValueError(_nothing_to_shard(src_dir, len(files), outside))
    if rejected:
        where = f", {outside} of them outside the split folders" if outside else ""
        print(
            f"{src_dir}: {rejected} of {len(files)} files are not clips to shard{where}; "
            "they are listed in rejects.jsonl when sharded"
        )
    names = sorted({label for r in records for label in r["labels"]})
    classes = [(name, name) for name in names] if names else None
    return finish(records, Path(out_dir), classes)


def prepare_unlabelled(src_dir: Path, out_dir: Path) -> Path:
    """A folder of audio for pretraining: no labels whatever the sub-folders are."""
    return prepare_folder(src_dir, out_dir, labels_from_subfolders=False)


def _nothing_to_shard(src_dir: Path, files: int, outside: int) -> str:
    if outside:
        return f"{src_dir}: all {outside} audio files are outside the split folders ({_split_folders()})"
    if files:
        return f"{src_dir}: no audio files among its {files} files (audio is {audio_names()})"
    return f"{src_dir}: no audio files (the folder is empty)"


def _split_folders() -> str:
    return " ".join(f"{name}/" for name in SPLIT_NAMES)


def _has_split_folders(src_dir: Path) -> bool:
    return any(p.is_dir() and p.name.lower() in SPLIT_NAMES for p in src_dir.iterdir())


def _split_of(rel: PurePosixPath) -> tuple[str | None, tuple[str, ...]]:
    """(split, the path's parts below the split folder); split None outside split folders."""
    if len(rel.parts) > 1 and rel.parts[0].lower() in SPLIT_NAMES:
        return SPLIT_NAMES[rel.parts[0].lower()], rel.parts[1:]
    return None, rel.parts
