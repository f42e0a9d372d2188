"""Google Speech Commands v1 (30 words) and v2 (35 words), and SUPERB's 12-class KS1.

Layout: `<word>/<speaker-hash>_nohash_<n>.wav`, `_background_noise_/*.wav`, and the
official `validation_list.txt` / `testing_list.txt` (paths relative to the root). Clips
listed there are split `valid` / `test`, the rest `train`. The label set is the word
folders found, so v1 gives 30 classes and v2 35 (SSAST/SSAMBA fine-tune on all of them).

KS1 (SUPERB keyword spotting, on v1): ten words keep their label, every other word
becomes `_unknown_`, and each background-noise recording becomes a long `_silence_`
clip in train (the DataModule's random crop cuts 1 s windows from it, as SUPERB
does). When SUPERB's separate test set `speech_commands_test_set_v0.01/` (which has
its own `_silence_` and `_unknown_` folders) sits inside or next to `src`, it is the
test split; otherwise `testing_list.txt` is.
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import clip_record, finish, require

BACKGROUND = "_background_noise_"
KS1_WORDS = ["yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go"]
KS1_CLASSES = [*KS1_WORDS, "_unknown_", "_silence_"]
KS1_TEST_SET = "speech_commands_test_set_v0.01"


def prepare_speechcommands(src_dir: Path, out_dir: Path, variant: str = "v2") -> Path:
    """variant: "v1" | "v2" (all words) or "ks1" (SUPERB 12 classes)."""
    if variant not in ("v1", "v2", "ks1"):
        raise ValueError(f"speech commands variant {variant!r} is not v1|v2|ks1")
    src_dir = Path(src_dir)
    valid = _read_list(
        require(src_dir / "validation_list.txt", "Speech Commands validation_list.txt")
    )
    test = _read_list(require(src_dir / "testing_list.txt", "Speech Commands testing_list.txt"))
    words = sorted(
        p.name
        for p in src_dir.iterdir()
        if p.is_dir() and not p.name.startswith("_") and p.name != KS1_TEST_SET
    )
    test_set = _ks1_test_set(src_dir) if variant == "ks1" else None
    records = []
    for word in words:
        for path in sorted((src_dir / word).glob("*.wav")):
            rel = f"{word}/{path.name}"
            split = "valid" if rel in valid else "test" if rel in test else "train"
            if split == "test" and test_set is not None:
                continue  # SUPERB tests on its own set instead
            label = _ks1_label(word) if variant == "ks1" else word
            records.append(
                clip_record(rel[:-4], path, [label], split, speaker=path.stem.split("_")[0])
            )
    if variant != "ks1":
        return finish(records, Path(out_dir), [(w, w) for w in words])
    for path in sorted((src_dir / BACKGROUND).glob("*.wav")):
        records.append(clip_record(f"{BACKGROUND}/{path.stem}", path, ["_silence_"], "train"))
    if test_set is not None:
        for path in sorted(test_set.glob("*/*.wav")):
            word = path.parent.name
            label = word if word in KS1_CLASSES else "_unknown_"
            records.append(clip_record(f"test_set/{word}/{path.stem}", path, [label], "test"))
    return finish(records, Path(out_dir), [(c, c) for c in KS1_CLASSES])


def prepare_speechcommands_v1(src_dir: Path, out_dir: Path) -> Path:
    return prepare_speechcommands(src_dir, out_dir, "v1")


def prepare_speechcommands_ks1(src_dir: Path, out_dir: Path) -> Path:
    return prepare_speechcommands(src_dir, out_dir, "ks1")


def _ks1_label(word: str) -> str:
    return word if word in KS1_WORDS else "_unknown_"


def _ks1_test_set(src_dir: Path) -> Path | None:
    for candidate in (src_dir / KS1_TEST_SET, src_dir.parent / KS1_TEST_SET):
        if candidate.is_dir():
            return candidate
    return None


def _read_list(path: Path) -> set[str]:
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}
