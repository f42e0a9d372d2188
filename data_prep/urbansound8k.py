"""UrbanSound8K: 8,732 clips (<= 4 s), 10 classes, 10 predefined folds.

`metadata/UrbanSound8K.csv` columns: slice_file_name,fsID,start,end,salience,fold,
classID,class; audio in `audio/fold<N>/`. Split "all" + `fold`: evaluation is
10-fold cross-validation, as the dataset's authors require.
"""

from __future__ import annotations

import csv
from pathlib import Path

from data_prep.manifest import clip_record, finish, require


def prepare_urbansound8k(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    meta = require(
        src_dir / "metadata" / "UrbanSound8K.csv", "UrbanSound8K metadata/UrbanSound8K.csv"
    )
    records, classes = [], {}
    with meta.open(newline="") as f:
        for row in csv.DictReader(f):
            fold = int(row["fold"])
            path = src_dir / "audio" / f"fold{fold}" / row["slice_file_name"]
            classes[int(row["classID"])] = row["class"]
            records.append(
                clip_record(
                    Path(row["slice_file_name"]).stem, path, [row["class"]], "all", fold=fold
                )
            )
    return finish(records, Path(out_dir), [(classes[i], classes[i]) for i in sorted(classes)])
