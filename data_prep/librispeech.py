"""LibriSpeech (any subset folder, or the root holding several): flac, no labels.

Files are `<subset>/<speaker>/<chapter>/<speaker>-<chapter>-<utt>.flac`. The split is
the subset name (`train-clean-100`, `dev-other`, ...) so pretraining can pick the
960 h of training subsets; `speaker` is kept for speaker-aware tasks.
"""

from __future__ import annotations

import re
from pathlib import Path

from data_prep.manifest import clip_record, finish

SUBSET = re.compile(r"^(train|dev|test)-(clean|other)(-\d+)?$")


def prepare_librispeech(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    if not src_dir.is_dir():
        raise FileNotFoundError(f"{src_dir}: LibriSpeech folder not found")
    records = []
    for path in sorted(src_dir.rglob("*.flac")):
        subset = next((p for p in reversed(path.parent.parts) if SUBSET.match(p)), "train")
        records.append(clip_record(path.stem, path, [], subset, speaker=path.stem.split("-")[0]))
    if not records:
        raise FileNotFoundError(
            f"{src_dir}: no .flac files (expected <subset>/<spk>/<chapter>/*.flac)"
        )
    return finish(records, Path(out_dir), None)
