"""VoxCeleb1 speaker identification (1,251 speakers) from the official `iden_split.txt`.

Lines are `<set> <speaker>/<video>/<utt>.wav` with set 1 = train, 2 = valid, 3 = test.
Audio is looked up under `src/wav/` (the layout of the official dev + test archives
merged) or directly under `src`. The label and `speaker` are the speaker id.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import clip_record, finish, require

SPLITS = {"1": "train", "2": "valid", "3": "test"}


def prepare_voxceleb1(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    split_file = require(src_dir / "iden_split.txt", "VoxCeleb1 iden_split.txt")
    audio_root = src_dir / "wav" if (src_dir / "wav").is_dir() else src_dir
    records = []
    for line_no, line in enumerate(split_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[0] not in SPLITS:
            raise ValueError(f"{split_file}:{line_no}: expected '<1|2|3> <spk>/<video>/<utt>.wav'")
        rel = Path(parts[1])
        speaker = rel.parts[0]
        records.append(
            clip_record(
                rel.with_suffix("").as_posix(),
                audio_root / rel,
                [speaker],
                SPLITS[parts[0]],
                speaker=speaker,
            )
        )
    speakers = sorted({r["speaker"] for r in records})
    return finish(records, Path(out_dir), [(s, s) for s in speakers])
