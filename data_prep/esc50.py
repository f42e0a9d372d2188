"""ESC-50: 2,000 five-second clips, 50 classes, 5 folds (`meta/esc50.csv`, `audio/`).

Evaluation is 5-fold cross-validation, so every clip gets split "all" and its `fold`
(1-5); a task picks its test fold from the json of each sample.
CSV columns: filename,fold,target,category,esc10,src_file,take.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep.manifest import clip_record, finish, require


def prepare_esc50(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    meta = require(src_dir / "meta" / "esc50.csv", "ESC-50 meta/esc50.csv")
    records, classes = [], {}
    with meta.open(newline="") as f:
        for row in csv.DictReader(f):
            path = src_dir / "audio" / row["filename"]
            classes[int(row["target"])] = row["category"]
            records.append(
                clip_record(
                    Path(row["filename"]).stem,
                    path,
                    [row["category"]],
                    "all",
                    fold=int(row["fold"]),
                )
            )
    return finish(records, Path(out_dir), [(classes[i], classes[i]) for i in sorted(classes)])
