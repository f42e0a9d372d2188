"""Free Spoken Digit Dataset: `recordings/{digit}_{speaker}_{index}.wav`, 8 kHz mono.

Official split: recording index 0-4 of every digit and speaker is test, the rest train.
`speaker` lets a task hold out one speaker (leave-one-speaker-out).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import clip_record, finish, require

TEST_INDICES = range(5)


def prepare_fsdd(src_dir: Path, out_dir: Path) -> Path:
    recordings = require(Path(src_dir) / "recordings", "FSDD recordings/ folder")
    records = []
    for path in sorted(recordings.glob("*.wav")):
        parts = path.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            raise ValueError(f"{path}: FSDD names are {{digit}}_{{speaker}}_{{index}}.wav")
        digit, speaker, index = parts
        split = "test" if int(index) in TEST_INDICES else "train"
        records.append(clip_record(path.stem, path, [digit], split, speaker=speaker))
    if not records:
        raise FileNotFoundError(f"{recordings}: no .wav recordings")
    return finish(records, Path(out_dir), [(str(d), str(d)) for d in range(10)])
