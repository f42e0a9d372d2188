"""`ssamba predict`: labels of a fine-tuned classifier for files, as `ssamba evaluate`
scores them, a timeline for long recordings, and unreadable files named."""

from __future__ import annotations

import csv
import itertools
import json
import tarfile
from pathlib import Path

import pytest
from test_finetune import FSDD, quick

from ssamba.predict import main as predict_main
from ssamba.tasks.evaluate_cli import main as evaluate_main
from ssamba.tasks.finetune_cli import latest_results
from ssamba.tasks.finetune_cli import main as finetune_main

# 2.56 s windows: every FSDD clip (at most 2.3 s) is one window, as evaluate scores it.
FRAMES = 256


@pytest.fixture(scope="module")
def classifier(subset_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A quick FSDD fine-tuning run's encoder.pt (head, labels, features)."""
    out = tmp_path_factory.mktemp("run")
    options = [*quick(subset_shards, out), f"--data.features.target_length={FRAMES}"]
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    return Path(json.loads(latest_results(out).read_text())["encoder_file"]["-"])


def test_csv_labels_give_evaluates_accuracy_on_the_same_clips(
    classifier: Path, subset_shards: Path, tmp_path: Path
) -> None:
    clips = tmp_path / "clips"  # the test clips exactly as the shards hold them
    clips.mkdir()
    digit = {}
    for tar in sorted(subset_shards.glob("*.tar")):
        with tarfile.open(tar) as archive:
            members = {m.name: m for m in archive.getmembers()}
            for name, member in members.items():
                if not name.endswith(".json"):
                    continue
                record = json.load(archive.extractfile(member))
                if record["split"] != "test":
                    continue
                key = name.removesuffix(".json")
                (clips / f"{key}.flac").write_bytes(archive.extractfile(f"{key}.flac").read())
                digit[f"{key}.flac"] = str(record["labels"][0])
    options = [f"--data.shards={subset_shards}", f"--data.features.target_length={FRAMES}"]
    ckpt = str(classifier)
    assert (
        evaluate_main(["--ckpt", ckpt, "--config", str(FSDD), *options, "--out", str(tmp_path)])
        == 0
    )
    accuracy = json.loads((tmp_path / "results.json").read_text())["value"]

    assert predict_main([str(clips), "--ckpt", ckpt, "--out", str(tmp_path / "p.csv")]) == 0

    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == len(digit) == 150 and {r["scope"] for r in rows} == {"clip"}
    top = {Path(r["file"]).name: r["labels"].split(";") for r in rows}
    assert all(len(labels) == 3 for labels in top.values())  # --top-k 3
    probabilities = [float(p) for p in rows[0]["probabilities"].split(";")]
    assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.0
    correct = sum(top[name][0] == label for name, label in digit.items())
    assert correct / len(digit) == pytest.approx(accuracy, abs=1e-6)  # float32


def test_a_long_recording_gets_a_timeline_and_an_unreadable_file_is_named(
    classifier: Path, sample_wav: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF not really a wave file")
    out = tmp_path / "p.json"

    code = predict_main(
        [str(sample_wav), str(broken), "--ckpt", str(classifier), "--out", str(out), "--timeline"]
    )

    assert code == 1
    assert f"FAILED {broken}" in capsys.readouterr().err
    records = {Path(r["file"]).name: r for r in json.loads(out.read_text())}
    assert "error" in records["broken.wav"]
    record = records[sample_wav.name]
    assert record["duration_s"] == pytest.approx(30.0, abs=0.1)
    timeline = record["timeline"]
    assert len(timeline) == 12  # 2.56 s windows over 30 s
    assert timeline[0]["start_s"] == 0.0
    assert all(a["end_s"] >= b["start_s"] for a, b in itertools.pairwise(timeline))
    assert timeline[-1]["end_s"] == pytest.approx(record["duration_s"], abs=1e-3)
    assert all(len(w["labels"]) == 3 and w["labels"][0] in map(str, range(10)) for w in timeline)


def test_bad_options_are_one_line_errors(classifier: Path, tmp_path: Path, capsys) -> None:
    for options, message in (
        (["--out", str(tmp_path / "p.txt")], "expected a .csv or .json file"),
        (["--out", str(tmp_path / "p.csv"), "--top-k", "0"], "--top-k: must be >= 1"),
    ):
        assert predict_main([str(tmp_path), "--ckpt", str(classifier), *options]) == 2
        assert message in capsys.readouterr().err
