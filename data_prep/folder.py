"""Any folder of audio: labels from first-level sub-folders (`src/<label>/**/clip.wav`), or none.

Clip ids are the paths relative to `src` without extension, so equal file names in
different sub-folders stay distinct. Everything goes to split "train".
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import AUDIO_EXTENSIONS, clip_record, find_audio, finish


def prepare_folder(src_dir: Path, out_dir: Path, labels_from_subfolders: bool = True) -> Path:
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: audio folder not found")
    records = []
    for path in find_audio(src_dir):
        rel = path.relative_to(src_dir)
        labels = [rel.parts[0]] if labels_from_subfolders and len(rel.parts) > 1 else []
        records.append(clip_record(rel.with_suffix("").as_posix(), path, labels, "train"))
    if not records:
        raise FileNotFoundError(f"{src_dir}: no audio files ({', '.join(AUDIO_EXTENSIONS)})")
    names = sorted({label for r in records for label in r["labels"]})
    classes = [(name, name) for name in names] if names else None
    return finish(records, Path(out_dir), classes)


def prepare_unlabelled(src_dir: Path, out_dir: Path) -> Path:
    """A folder of audio for pretraining: no labels whatever the sub-folders are."""
    return prepare_folder(src_dir, out_dir, labels_from_subfolders=False)
