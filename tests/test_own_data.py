"""A user's own data: a CSV/JSONL list or a folder of audio, through `ssamba shard`.

Every input file ends in a shard or in rejects.jsonl, keys never collide, bad lists fail
before anything is written, and a resumed run checks the tars it is asked to trust.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from test_datamodules import fsdd_clips, write_shard_folder
from test_finetune import FSDD

from data_prep import prepare
from data_prep.__main__ import shard_main
from data_prep.manifest import read_manifest
from ssamba.audio import AUDIO_EXTENSIONS
from ssamba.data import LabelledDataModule
from ssamba.data.shard_format import read_labels, sample_key
from ssamba.data.shards import iter_shard
from ssamba.features import FeatureConfig
from ssamba.tasks.finetune_cli import ClassifyCLI


def _tone(path: Path, seconds: float = 0.2, sr: int = 16000, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(path, (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr, **kwargs)
    return path


def _samples(out: Path) -> dict[str, dict]:
    """id -> json of every sample in the shards index.json lists, keys checked unique."""
    index = json.loads((out / "index.json").read_text())
    metas, keys = {}, set()
    for entry in index["splits"].values():
        for shard in entry["shards"]:
            for clip in iter_shard(str(out / shard["file"])):
                assert clip.audio and clip.meta is not None and clip.key not in keys
                keys.add(clip.key)
                metas[clip.meta["id"]] = clip.meta
    return metas


def _rejects(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]


def _shard(corpus: str, src: Path, out: Path) -> int:
    return shard_main(["--corpus", corpus, "--src", str(src), "--out", str(out)])


# ------------------------------------------------------------------ manifest lists


def test_csv_list_shards_with_its_splits_labels_and_extra_columns(
    fsdd_dir: Path, tmp_path: Path
) -> None:
    clips = tmp_path / "my_data" / "audio"
    clips.mkdir(parents=True)
    for name in ("3_theo_10.wav", "7_theo_11.wav", "3_lucas_12.wav"):
        shutil.copy(fsdd_dir / "recordings" / name, clips / name)
    listing = tmp_path / "my_data" / "clips.csv"
    listing.write_text(
        "path,labels,split,speaker,fold,mic\n"
        "audio/3_theo_10.wav,three;odd,train,theo,1,close\n"
        "audio/7_theo_11.wav,seven;odd,val,theo,2,far\n"
        f"{clips / '3_lucas_12.wav'},three,test,lucas,1,close\n"
    )
    out = tmp_path / "shards"
    assert _shard("manifest", listing, out) == 0
    samples = _samples(out)
    assert set(samples) == {"audio/3_theo_10", "audio/7_theo_11", "audio/3_lucas_12"}
    theo = samples["audio/3_theo_10"]
    assert theo["labels"] == ["three", "odd"] and theo["split"] == "train"
    assert theo["speaker"] == "theo" and theo["fold"] == 1 and theo["mic"] == "close"
    assert theo["source"] == str(clips / "3_theo_10.wav")
    assert samples["audio/7_theo_11"]["split"] == "valid"  # `val` is the valid split
    assert json.loads((out / "stats.json").read_text())["splits"] == {
        "test": 1,
        "train": 1,
        "valid": 1,
    }
    assert [c for c, _ in read_labels(out / "labels.csv")] == ["odd", "seven", "three"]


def test_jsonl_list_takes_one_label_or_several_and_defaults_to_train(tmp_path: Path) -> None:
    _tone(tmp_path / "a.wav")
    _tone(tmp_path / "sub" / "b.flac")
    listing = tmp_path / "clips.jsonl"
    rows = [
        {"path": "a.wav", "label": "dog", "room": {"size": 3}},
        {"path": "sub/b.flac", "labels": ["dog", "bark"], "split": "test", "id": "clip-b"},
    ]
    listing.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "shards"
    assert _shard("manifest", listing, out) == 0
    samples = _samples(out)
    assert samples["a"]["labels"] == ["dog"] and samples["a"]["split"] == "train"
    assert samples["a"]["room"] == {"size": 3}
    assert samples["clip-b"]["labels"] == ["dog", "bark"] and samples["clip-b"]["split"] == "test"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("file,label\na.wav,dog\n", r"clips\.csv:1: no 'path' column \(columns: file, label\)"),
        ("path,split\na.wav,train\na.wav,training\n", r"clips\.csv:3: split 'training'"),
        ("path,label\na.wav,dog\n,cat\n", r"clips\.csv:3: empty path"),
        ("path,label,labels\na.wav,dog,cat\n", r"clips\.csv:1: both 'label' and 'labels'"),
        ("path\na.wav\na.wav\n", r"clips\.csv:3: path 'a\.wav' is already listed on line 2"),
        ("path,id\na.wav,x\nb.wav,x\n", r"clips\.csv:3: clip id 'x' is already used on line 2"),
        ("path,source\na.wav,mic\n", r"clips\.csv:1: column 'source' is reserved"),
        ("path,fold\na.wav,one\n", r"clips\.csv:2: fold 'one' is not a whole number"),
    ],
)
def test_bad_list_names_file_and_line_and_writes_nothing(
    text: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _tone(tmp_path / "a.wav")
    listing = tmp_path / "clips.csv"
    listing.write_text(text)
    out = tmp_path / "shards"
    assert _shard("manifest", listing, out) == 2
    err = capsys.readouterr().err
    assert err.startswith("ssamba shard: ") and err.count("\n") == 1
    assert re.search(problem, err), err
    assert not out.exists() or not any(out.iterdir())


def test_listed_file_that_is_missing_is_a_reject_not_an_abort(tmp_path: Path) -> None:
    _tone(tmp_path / "a.wav")
    listing = tmp_path / "clips.csv"
    listing.write_text("path,label\na.wav,dog\ngone.wav,cat\n")
    out = tmp_path / "shards"
    assert _shard("manifest", listing, out) == 0
    assert set(_samples(out)) == {"a"}
    ((reject,),) = [_rejects(out)]
    assert reject["id"] == "gone" and "file not found" in reject["reason"]


# ------------------------------------------------------------------ folders


def test_folder_split_folders_give_the_split_and_the_next_level_the_label(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    _tone(src / "train" / "dog" / "a.wav")
    _tone(src / "train" / "cat" / "b.wav")
    _tone(src / "val" / "dog" / "c.wav")
    _tone(src / "validation" / "cat" / "d.wav")
    _tone(src / "test" / "cat" / "e.wav")
    records = {r["id"]: r for r in read_manifest(prepare("folder", src, tmp_path / "out"))}
    assert {k: (r["split"], r["labels"]) for k, r in records.items()} == {
        "train/dog/a": ("train", ["dog"]),
        "train/cat/b": ("train", ["cat"]),
        "val/dog/c": ("valid", ["dog"]),
        "validation/cat/d": ("valid", ["cat"]),
        "test/cat/e": ("test", ["cat"]),
    }
    assert [c for c, _ in read_labels(tmp_path / "out" / "labels.csv")] == ["cat", "dog"]


def test_a_file_directly_in_a_split_folder_of_labelled_clips_is_rejected_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "sounds"
    _tone(src / "train" / "dog" / "a.wav")
    _tone(src / "train" / "stray.wav")
    _tone(src / "test" / "dog" / "b.wav")
    out = tmp_path / "shards"

    assert _shard("folder", src, out) == 0

    assert set(_samples(out)) == {"train/dog/a", "test/dog/b"}
    ((reject,),) = [_rejects(out)]
    assert reject["id"] == "train/stray"
    reason = "directly in the split folder train/, not in a label folder below it"
    assert reject["reason"].endswith(reason)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "not sharded" in line]
    assert line == f"{(src / 'train' / 'stray.wav').resolve()}: {reason}; not sharded"


def test_the_default_fine_tuning_recipe_never_trains_on_a_valid_split(
    fsdd_dir: Path, tmp_path: Path
) -> None:
    clips = fsdd_clips(fsdd_dir, ["jackson"], [0, 5, 6])  # take 0: test, 5 and 6: train
    for clip in clips[20:]:
        clip.meta["split"] = "valid"  # the user's validation split: take 6
    folder = write_shard_folder(tmp_path / "shards", {"all": [clips]})
    recipe = ClassifyCLI(["--config", str(FSDD), f"--data.shards={folder}"], parse_only=True)
    data = recipe.config["data"].as_dict()
    data["features"] = FeatureConfig(**data["features"])
    data = LabelledDataModule(**data)

    counts = data.split_clips()

    trained = {clip.meta["id"] for clip in data.subsets["train"]}
    assert counts["test"] == 10 and trained
    assert not [clip_id for clip_id in trained if clip_id.endswith("_6")]


def test_folder_takes_every_format_soundfile_decodes(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    formats = {
        ".aiff": {},
        ".aif": {"format": "AIFF"},
        ".au": {},
        ".caf": {},
        ".ogg": {},
        ".opus": {"format": "OGG", "subtype": "OPUS"},
        ".mp3": {"format": "MP3"},
        ".flac": {},
        ".wav": {},
    }
    for ext, kwargs in formats.items():
        _tone(src / f"clip{ext}", 0.5, 48000 if ext == ".opus" else 16000, **kwargs)
    assert set(formats) <= AUDIO_EXTENSIONS
    out = tmp_path / "shards"
    assert _shard("unlabelled", src, out) == 0
    assert {m["source"].rsplit(".", 1)[1] for m in _samples(out).values()} == {
        ext[1:] for ext in formats
    }
    assert _rejects(out) == []


def test_same_name_with_another_extension_gets_its_own_sample(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    _tone(src / "dog" / "x.wav")
    _tone(src / "dog" / "x.flac", 0.3)
    _tone(src / "dog" / "y.wav")
    out = tmp_path / "shards"
    assert _shard("folder", src, out) == 0
    samples = _samples(out)
    assert set(samples) == {"dog/x.wav", "dog/x.flac", "dog/y"}  # ids stay stems where unique
    assert samples["dog/x.flac"]["duration"] == pytest.approx(0.3)


def test_names_differing_in_unsafe_characters_get_distinct_keys(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    names = ["a b.wav", "a_b.wav", "a.b.wav", "a~b.wav", "ä_b.wav"]
    for name in names:
        _tone(src / name)
    out = tmp_path / "shards"
    assert _shard("unlabelled", src, out) == 0
    assert set(_samples(out)) == {Path(n).stem for n in names}
    assert _rejects(out) == []


def test_keys_hold_no_dots_and_keep_plain_ids_as_they_are() -> None:
    ids = ["a b", "a_b", "a.b", "a~2eb", "a~b", "x.wav", "x_wav", "ä", "/a", "a//b", "a/"]
    keys = [sample_key(i) for i in ids]
    assert len(set(keys)) == len(ids)
    assert not any("." in k or k.startswith("/") or k.endswith("/") or "//" in k for k in keys)
    plain = ["4_lucas_3", "yes/0b09edd3_nohash_1", "--PJHxphWEs", "1-100032-A-0"]
    assert [sample_key(i) for i in plain] == plain


def test_non_audio_file_in_a_folder_is_a_reject_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "sounds"
    _tone(src / "dog" / "a.wav")
    (src / "dog" / "a.txt").write_text("recorded in the garden")
    out = tmp_path / "shards"
    assert _shard("folder", src, out) == 0
    assert set(_samples(out)) == {"dog/a"}  # the transcript beside it leaves its id alone
    ((reject,),) = [_rejects(out)]
    assert reject["id"] == "dog/a.txt" and "not an audio file (.txt" in reject["reason"]
    assert "1 rejected" in capsys.readouterr().out
    assert [c for c, _ in read_labels(out / "labels.csv")] == ["dog"]


def test_folder_with_nothing_usable_exits_non_zero_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "sounds"
    src.mkdir()
    (src / "readme.txt").write_text("no audio here")
    assert _shard("folder", src, tmp_path / "a") == 2
    err = capsys.readouterr().err
    assert err.startswith("ssamba shard: ") and err.count("\n") == 1 and "no audio" in err
    (src / "broken.wav").write_bytes(b"RIFF....WAVEjunk" * 8)
    assert _shard("folder", src, tmp_path / "b") == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the progress bar
    assert last.startswith("ssamba shard: ") and "all 2 clips were rejected" in last
    assert len(_rejects(tmp_path / "b")) == 2


def test_unknown_corpus_folder_error_is_prefixed_by_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _shard("esc50", tmp_path / "nowhere", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("ssamba shard: ") and "esc50.csv not found" in err


def test_manifest_of_a_folder_list_is_reproducible(tmp_path: Path) -> None:
    src = tmp_path / "sounds"
    _tone(src / "b.wav")
    _tone(src / "a.wav")
    listing = tmp_path / "list.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label"])
        writer.writerows([["sounds/b.wav", "x"], ["sounds/a.wav", "y"]])
    first = read_manifest(prepare("manifest", listing, tmp_path / "one"))
    second = read_manifest(prepare("manifest", listing, tmp_path / "two"))
    assert first == second and [r["id"] for r in first] == ["sounds/b", "sounds/a"]
