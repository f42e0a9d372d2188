"""Corpus recipes read the official metadata formats into one manifest shape.

For corpora not on this machine the tests build tiny trees with the official file
layouts and metadata formats, holding short synthesised clips.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from data_prep import CORPORA, prepare
from data_prep.__main__ import main
from data_prep.manifest import read_manifest, write_manifest
from ssamba.data.shard_format import read_labels


def _clip(path: Path, seconds: float = 0.2, sr: int = 16000) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr)
    return path


def _by_id(manifest: Path) -> dict[str, dict]:
    return {r["id"]: r for r in read_manifest(manifest)}


def test_every_corpus_named_in_the_brief_has_a_recipe() -> None:
    expected = {
        "audioset",
        "librispeech",
        "esc50",
        "speechcommands_v1",
        "speechcommands_v2",
        "speechcommands_ks1",
        "voxceleb1",
        "iemocap",
        "urbansound8k",
        "fsdd",
        "folder",
        "unlabelled",
        "manifest",
    }
    assert expected <= set(CORPORA)


def test_fsdd_official_split_and_speakers(fsdd_dir: Path, tmp_path: Path) -> None:
    records = read_manifest(prepare("fsdd", fsdd_dir, tmp_path))
    assert len(records) == 3000
    assert sum(r["split"] == "test" for r in records) == 300
    assert len({r["speaker"] for r in records}) == 6
    first = next(r for r in records if r["id"] == "4_lucas_3")
    assert first["labels"] == ["4"] and first["split"] == "test" and first["speaker"] == "lucas"
    assert 0.1 < first["duration"] < 2.0
    assert [name for _, name in read_labels(tmp_path / "labels.csv")] == [str(d) for d in range(10)]


def test_esc50_labels_and_folds(tmp_path: Path) -> None:
    src = tmp_path / "ESC-50-master"
    rows = [
        ("1-100032-A-0.wav", 1, 0, "dog"),
        ("1-110389-A-1.wav", 1, 1, "rooster"),
        ("5-9032-A-0.wav", 5, 0, "dog"),
    ]
    (src / "meta").mkdir(parents=True)
    with (src / "meta" / "esc50.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        for name, fold, target, category in rows:
            writer.writerow([name, fold, target, category, "True", name.split("-")[1], "A"])
            _clip(src / "audio" / name, 5.0, 44100)
    records = _by_id(prepare("esc50", src, tmp_path / "out"))
    assert records["5-9032-A-0"]["fold"] == 5 and records["5-9032-A-0"]["labels"] == ["dog"]
    assert records["1-110389-A-1"]["split"] == "all"
    assert records["1-100032-A-0"]["duration"] == pytest.approx(5.0)
    assert read_labels(tmp_path / "out" / "labels.csv") == [("dog", "dog"), ("rooster", "rooster")]


def test_urbansound8k_uses_fold_folders(tmp_path: Path) -> None:
    src = tmp_path / "UrbanSound8K"
    (src / "metadata").mkdir(parents=True)
    header = "slice_file_name,fsID,start,end,salience,fold,classID,class\n"
    lines = [
        "100032-3-0-0.wav,100032,0.0,0.3,1,5,3,dog_bark\n",
        "7061-6-0-0.wav,7061,0,0.2,2,1,6,gun_shot\n",
    ]
    (src / "metadata" / "UrbanSound8K.csv").write_text(header + "".join(lines))
    _clip(src / "audio" / "fold5" / "100032-3-0-0.wav")
    _clip(src / "audio" / "fold1" / "7061-6-0-0.wav")
    records = _by_id(prepare("urbansound8k", src, tmp_path / "out"))
    assert records["100032-3-0-0"]["fold"] == 5
    assert records["7061-6-0-0"]["labels"] == ["gun_shot"]
    assert [c for c, _ in read_labels(tmp_path / "out" / "labels.csv")] == ["dog_bark", "gun_shot"]


def test_audioset_matches_clips_to_segment_rows_and_counts_the_missing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "audioset"
    meta = src / "metadata"
    meta.mkdir(parents=True)
    (meta / "class_labels_indices.csv").write_text(
        'index,mid,display_name\n0,/m/09x0r,"Speech"\n1,/m/05zppz,"Male speech, man speaking"\n'
        "2,/m/0jbk,Animal\n"
    )
    comment = "# Segments csv created Sun Mar  5 10:54:25 2017\n# num_ytids=3\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (meta / "balanced_train_segments.csv").write_text(
        comment
        + '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/05zppz"\n'
        + '-0RWZT-miFs, 420.000, 430.000, "/m/0jbk"\n'
        + 'missingclip, 0.000, 10.000, "/m/0jbk"\n'
    )
    (meta / "eval_segments.csv").write_text(comment + '-0SdAVK79lg, 30.000, 40.000, "/m/0jbk"\n')
    _clip(src / "audio" / "bal" / "Y--PJHxphWEs.wav")
    _clip(src / "audio" / "bal" / "-0RWZT-miFs_420000_430000.flac")
    _clip(src / "audio" / "eval" / "Y-0SdAVK79lg.wav")
    records = _by_id(prepare("audioset", src, tmp_path / "out"))
    assert set(records) == {"--PJHxphWEs", "-0RWZT-miFs", "-0SdAVK79lg"}
    assert records["--PJHxphWEs"]["labels"] == ["/m/09x0r", "/m/05zppz"]
    assert records["--PJHxphWEs"]["split"] == "balanced_train"
    assert records["-0SdAVK79lg"]["split"] == "eval"
    assert "1 balanced_train segments have no local clip" in capsys.readouterr().out
    assert read_labels(tmp_path / "out" / "labels.csv")[1] == (
        "/m/05zppz",
        "Male speech, man speaking",
    )


def test_librispeech_split_is_the_subset_and_has_no_labels(tmp_path: Path) -> None:
    src = tmp_path / "LibriSpeech"
    _clip(src / "train-clean-100" / "19" / "198" / "19-198-0001.flac")
    _clip(src / "dev-other" / "116" / "288045" / "116-288045-0000.flac")
    records = _by_id(prepare("librispeech", src, tmp_path / "out"))
    assert records["19-198-0001"]["split"] == "train-clean-100"
    assert records["116-288045-0000"] == {
        **records["116-288045-0000"],
        "split": "dev-other",
        "speaker": "116",
    }
    assert all(r["labels"] == [] for r in records.values())
    assert not (tmp_path / "out" / "labels.csv").exists()


def _speech_commands(root: Path) -> Path:
    for word in ("yes", "no", "cat"):
        for n, speaker in enumerate(("0a7c2a8d", "0b09edd3", "0c40e715")):
            _clip(root / word / f"{speaker}_nohash_{n}.wav")
    _clip(root / "_background_noise_" / "white_noise.wav", 3.0)
    (root / "validation_list.txt").write_text(
        "yes/0b09edd3_nohash_1.wav\ncat/0b09edd3_nohash_1.wav\n"
    )
    (root / "testing_list.txt").write_text("yes/0c40e715_nohash_2.wav\nno/0c40e715_nohash_2.wav\n")
    return root


def test_speech_commands_splits_from_the_official_lists(tmp_path: Path) -> None:
    src = _speech_commands(tmp_path / "speech_commands_v0.02")
    records = _by_id(prepare("speechcommands_v2", src, tmp_path / "out"))
    assert len(records) == 9  # background noise is not a word
    assert records["yes/0b09edd3_nohash_1"]["split"] == "valid"
    assert records["no/0c40e715_nohash_2"]["split"] == "test"
    assert records["cat/0a7c2a8d_nohash_0"] == {
        **records["cat/0a7c2a8d_nohash_0"],
        "split": "train",
        "labels": ["cat"],
        "speaker": "0a7c2a8d",
    }
    assert [c for c, _ in read_labels(tmp_path / "out" / "labels.csv")] == ["cat", "no", "yes"]


def test_ks1_maps_other_words_to_unknown_and_adds_silence(tmp_path: Path) -> None:
    src = _speech_commands(tmp_path / "speech_commands_v0.01")
    test_set = tmp_path / "speech_commands_test_set_v0.01"
    _clip(test_set / "_silence_" / "silence_0.wav", 1.0)
    _clip(test_set / "_unknown_" / "bed_0.wav", 1.0)
    _clip(test_set / "yes" / "abc_nohash_0.wav", 1.0)
    records = _by_id(prepare("speechcommands_ks1", src, tmp_path / "out"))
    assert records["cat/0a7c2a8d_nohash_0"]["labels"] == ["_unknown_"]
    assert records["_background_noise_/white_noise"]["labels"] == ["_silence_"]
    test = {k: r["labels"][0] for k, r in records.items() if r["split"] == "test"}
    assert test == {
        "test_set/_silence_/silence_0": "_silence_",
        "test_set/_unknown_/bed_0": "_unknown_",
        "test_set/yes/abc_nohash_0": "yes",
    }
    assert len(read_labels(tmp_path / "out" / "labels.csv")) == 12


def test_voxceleb1_identification_split(tmp_path: Path) -> None:
    src = tmp_path / "VoxCeleb1"
    lines = [
        "1 id10001/1zcIwhmdeo4/00001.wav",
        "2 id10001/1zcIwhmdeo4/00002.wav",
        "3 id10002/C7k7C-PDvAA/00001.wav",
    ]
    (src).mkdir()
    (src / "iden_split.txt").write_text("\n".join(lines) + "\n")
    for line in lines:
        _clip(src / "wav" / line.split()[1])
    records = _by_id(prepare("voxceleb1", src, tmp_path / "out"))
    assert [records[k]["split"] for k in sorted(records)] == ["train", "valid", "test"]
    assert records["id10002/C7k7C-PDvAA/00001"]["labels"] == ["id10002"]
    assert [c for c, _ in read_labels(tmp_path / "out" / "labels.csv")] == ["id10001", "id10002"]


def test_iemocap_four_classes_with_excited_as_happy(tmp_path: Path) -> None:
    src = tmp_path / "IEMOCAP_full_release"
    for session, lines in (
        (
            1,
            [
                ("Ses01F_impro01_F000", "neu"),
                ("Ses01F_impro01_M001", "exc"),
                ("Ses01F_impro01_F002", "fru"),
            ],
        ),
        (2, [("Ses02M_script01_1_F000", "sad")]),
    ):
        eval_dir = src / f"Session{session}" / "dialog" / "EmoEvaluation"
        eval_dir.mkdir(parents=True)
        dialog = lines[0][0].rsplit("_", 1)[0]
        text = "% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]\n\n"
        for utt, emotion in lines:
            text += f"[6.2901 - 8.2357]\t{utt}\t{emotion}\t[2.5000, 2.5000, 2.5000]\nC-E2:\tNeutral;\t()\n"
            _clip(src / f"Session{session}" / "sentences" / "wav" / dialog / f"{utt}.wav")
        (eval_dir / f"{dialog}.txt").write_text(text)
    records = _by_id(prepare("iemocap", src, tmp_path / "out"))
    assert set(records) == {"Ses01F_impro01_F000", "Ses01F_impro01_M001", "Ses02M_script01_1_F000"}
    assert records["Ses01F_impro01_M001"]["labels"] == ["hap"]
    assert records["Ses01F_impro01_M001"]["speaker"] == "Ses01M"
    assert records["Ses02M_script01_1_F000"]["fold"] == 2
    assert [c for c, _ in read_labels(tmp_path / "out" / "labels.csv")] == [
        "neu",
        "hap",
        "ang",
        "sad",
    ]


def test_folder_labels_come_from_subfolders_or_none(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    _clip(src / "birds" / "a.wav")
    _clip(src / "cars" / "night" / "a.wav")
    _clip(src / "loose.ogg")
    labelled = _by_id(prepare("folder", src, tmp_path / "labelled"))
    assert labelled["birds/a"]["labels"] == ["birds"]
    assert labelled["cars/night/a"]["labels"] == ["cars"]
    assert labelled["loose"]["labels"] == []
    unlabelled = _by_id(prepare("unlabelled", src, tmp_path / "unlabelled"))
    assert all(r["labels"] == [] for r in unlabelled.values()) and len(unlabelled) == 3


def test_unreadable_clip_stays_in_the_manifest_for_the_shard_writer_to_reject(
    tmp_path: Path,
) -> None:
    src = tmp_path / "sounds"
    _clip(src / "fine.wav")
    (src / "broken.wav").write_bytes(b"not audio")
    records = _by_id(prepare("unlabelled", src, tmp_path / "out"))
    assert records["broken"]["duration"] is None
    assert records["fine"]["duration"] == pytest.approx(0.2)


def test_missing_metadata_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"meta/esc50\.csv"):
        prepare("esc50", tmp_path, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"iden_split\.txt"):
        prepare("voxceleb1", tmp_path, tmp_path / "out")
    with pytest.raises(ValueError, match="unknown corpus 'timit'"):
        prepare("timit", tmp_path, tmp_path / "out")


def test_duplicate_ids_are_refused(tmp_path: Path) -> None:
    record = {"id": "a", "path": "/x.wav", "labels": [], "duration": 1.0, "split": "train"}
    with pytest.raises(ValueError, match="duplicate clip ids"):
        write_manifest([record, dict(record)], tmp_path)


def test_prepare_command_writes_manifest_and_reports(
    fsdd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(["prepare", "--corpus", "fsdd", "--src", str(fsdd_dir), "--out", str(tmp_path)]) == 0
    )
    assert "fsdd: 3000 clips" in capsys.readouterr().out
    first = json.loads((tmp_path / "manifest.jsonl").read_text().splitlines()[0])
    assert set(first) == {"id", "path", "labels", "duration", "split", "speaker"}
    assert (
        main(
            ["prepare", "--corpus", "esc50", "--src", str(tmp_path / "no"), "--out", str(tmp_path)]
        )
        == 2
    )
    assert "esc50.csv not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["prepare", "shard", "stats", "render-gm-drums"])
def test_every_command_explains_itself(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert "--" in capsys.readouterr().out
