"""IEMOCAP 4-class emotion recognition as in SUPERB: neu, hap (+ exc merged), ang, sad.

Layout: `Session{1..5}/sentences/wav/<dialog>/<utt>.wav`, labels from
`Session{n}/dialog/EmoEvaluation/<dialog>.txt` lines
`[start - end]<TAB><utt><TAB><emotion><TAB>[v, a, d]`. Utterances with other emotions
(fru, sur, xxx, ...) are outside the task and counted, not kept. The five sessions are
the five cross-validation folds (split "all", `fold` = session); `speaker` is session +
gender of the speaking actor (e.g. Ses01F).
"""

from __future__ import annotations

from pathlib import Path

from data_prep.manifest import clip_record, finish

EMOTIONS = {"neu": "neu", "hap": "hap", "exc": "hap", "ang": "ang", "sad": "sad"}
CLASSES = ["neu", "hap", "ang", "sad"]


def prepare_iemocap(src_dir: Path, out_dir: Path) -> Path:
    src_dir = Path(src_dir)
    sessions = sorted(src_dir.glob("Session[1-5]"))
    if not sessions:
        raise FileNotFoundError(f"{src_dir}: no Session1..Session5 folders (IEMOCAP_full_release)")
    records, skipped = [], 0
    for session in sessions:
        fold = int(session.name[-1])
        for utt, emotion in _read_evaluations(session):
            if emotion not in EMOTIONS:
                skipped += 1
                continue
            dialog = utt.rsplit("_", 1)[0]
            path = session / "sentences" / "wav" / dialog / f"{utt}.wav"
            speaker = utt[:5] + utt.rsplit("_", 1)[1][0]
            records.append(
                clip_record(utt, path, [EMOTIONS[emotion]], "all", fold=fold, speaker=speaker)
            )
    print(f"iemocap: kept {len(records)} utterances, {skipped} with other emotions left out")
    return finish(records, Path(out_dir), [(c, c) for c in CLASSES])


def _read_evaluations(session: Path) -> list[tuple[str, str]]:
    """(utterance id, emotion) from every EmoEvaluation/*.txt of a session."""
    pairs = []
    for path in sorted((session / "dialog" / "EmoEvaluation").glob("*.txt")):
        for line in path.read_text().splitlines():
            if line.startswith("["):
                fields = line.split("\t")
                if len(fields) < 3:
                    raise ValueError(f"{path}: malformed evaluation line {line!r}")
                pairs.append((fields[1].strip(), fields[2].strip()))
    return pairs
