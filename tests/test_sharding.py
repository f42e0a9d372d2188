"""Shards: every clip lands in exactly one shard or in rejects, readable, resumable."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds

from data_prep import prepare
from data_prep.__main__ import main, shard_main
from data_prep.manifest import read_manifest
from data_prep.parallel import single_torch_thread
from data_prep.shard import plan_shards, write_shards
from data_prep.stats import compute_stats
from ssamba.audio import load_audio
from ssamba.data.shards import iter_shard
from ssamba.features import FbankConfig, wav_to_fbank

SUBSET = 40  # clips of FSDD copied for the fast tests


@pytest.fixture
def fsdd_subset(fsdd_dir: Path, tmp_path: Path) -> Path:
    """A small FSDD copy with the official layout: 4 speakers x digits 0-4 x indices 0-1."""
    src = tmp_path / "fsdd"
    (src / "recordings").mkdir(parents=True)
    speakers = ["george", "jackson", "lucas", "nicolas"]
    names = [f"{d}_{s}_{i}.wav" for s in speakers for d in range(5) for i in (0, 9)]
    for name in names[:SUBSET]:
        shutil.copy(fsdd_dir / "recordings" / name, src / "recordings" / name)
    return src


def _read_back(out: Path) -> list[dict]:
    """Every sample of every shard listed in index.json, checked against its split."""
    index = json.loads((out / "index.json").read_text())
    metas = []
    for split, entry in index["splits"].items():
        for shard in entry["shards"]:
            samples = [clip.meta for clip in iter_shard(str(out / shard["file"]))]
            assert len(samples) == shard["clips"]
            assert {m["split"] for m in samples} == {split}
            metas += samples
    return metas


def test_subset_round_trips_with_metadata_and_audio(fsdd_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    stats = write_shards(prepare("fsdd", fsdd_subset, out), out, shard_size=8)
    assert stats["clips"] == SUBSET and stats["rejects"] == 0
    assert stats["splits"] == {"test": 20, "train": 20}
    metas = _read_back(out)
    assert sorted(m["id"] for m in metas) == sorted(
        r["id"] for r in read_manifest(out / "manifest.jsonl")
    )
    first = next(iter_shard(str(out / "train-000000.tar")))
    meta, flac = first.meta, first.audio
    assert meta["labels"] == [meta["id"][0]] and meta["sample_rate"] == 16000
    decoded, sr = load_audio(flac)
    original, _ = load_audio(meta["source"])
    assert sr == 16000 and decoded.numel() == original.numel()
    assert meta["duration"] == pytest.approx(original.numel() / 16000)
    assert (decoded - original).abs().max() < 1 / 32768 + 1e-6  # PCM16 quantisation only
    assert (out / "labels.csv").exists() and (out / "rejects.jsonl").read_text() == ""


def test_corrupt_clips_are_rejected_with_reasons(fsdd_subset: Path, tmp_path: Path) -> None:
    recordings = fsdd_subset / "recordings"
    (recordings / "0_george_0.wav").write_bytes(b"")
    (recordings / "1_george_9.wav").write_bytes(b"RIFF....WAVEjunk" * 8)
    truncated = recordings / "2_jackson_0.wav"
    truncated.write_bytes(truncated.read_bytes()[:2000])
    out = tmp_path / "shards"
    args = ["--corpus", "fsdd", "--src", str(fsdd_subset), "--out", str(out), "--shard-size", "6"]
    code = shard_main(args)  # what `ssamba shard ...` runs
    assert code == 0
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = {r["id"]: r["reason"] for r in rejects}
    assert set(reasons) == {"0_george_0", "1_george_9", "2_jackson_0"}
    assert "empty" in reasons["0_george_0"]
    assert "cannot decode" in reasons["1_george_9"]
    assert "truncated" in reasons["2_jackson_0"]
    assert all(str(recordings) in r["path"] and r["path"] in r["reason"] for r in rejects)
    ids = [m["id"] for m in _read_back(out)]
    assert len(ids) == len(set(ids)) == SUBSET - 3
    assert set(ids).isdisjoint(reasons)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["clips"] == SUBSET - 3 and stats["rejects"] == 3


def test_rerun_skips_finished_shards_and_redoes_an_interrupted_one(
    fsdd_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    manifest = prepare("fsdd", fsdd_subset, out)
    write_shards(manifest, out, shard_size=8)
    tars = sorted(out.glob("*.tar"))
    stamps = {p.name: p.stat().st_mtime_ns for p in tars}
    # simulate a crash while writing train-000001: its summary never got written
    (out / "train-000001.done.json").unlink()
    (out / "train-000001.tar").rename(out / "train-000001.tar.tmp")
    stats = write_shards(manifest, out, shard_size=8)
    assert "resuming: 5 of 6 shards already complete" in capsys.readouterr().out
    assert stats["clips"] == SUBSET
    for path in tars:
        if path.name != "train-000001.tar":
            assert path.stat().st_mtime_ns == stamps[path.name], f"{path.name} was rewritten"
    assert not list(out.glob("*.tmp"))
    assert len(_read_back(out)) == SUBSET
    with pytest.raises(ValueError, match=r"different plan.*shard_size"):
        write_shards(manifest, out, shard_size=5)


@pytest.mark.parametrize("damage", ["deleted", "truncated", "cut_between_members"])
def test_rerun_checks_each_finished_tar_and_rewrites_a_damaged_one(
    damage: str, fsdd_subset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "shards"
    manifest = prepare("fsdd", fsdd_subset, out)
    write_shards(manifest, out, shard_size=8)
    damaged = out / "test-000001.tar"
    whole = damaged.read_bytes()
    if damage == "deleted":
        damaged.unlink()
    elif damage == "truncated":
        damaged.write_bytes(whole[: len(whole) // 2])
    else:  # same tar, one sample fewer, padded back to the recorded size
        samples = list(iter_shard(str(damaged)))
        damaged.unlink()
        with wds.TarWriter(str(damaged)) as sink:
            for clip in samples[1:]:
                sink.write({"__key__": clip.key, "flac": clip.audio, "json": clip.meta})
        damaged.write_bytes(damaged.read_bytes().ljust(len(whole), b"\0"))
    capsys.readouterr()
    stats = write_shards(manifest, out, shard_size=8)
    printed = capsys.readouterr().out
    assert "test-000001.tar" in printed and "rewriting" in printed
    assert "resuming: 5 of 6 shards already complete" in printed
    assert damaged.stat().st_size == len(whole)
    assert stats["clips"] == SUBSET and len(_read_back(out)) == SUBSET


def test_plan_assigns_each_clip_once_and_cuts_by_size() -> None:
    records = [
        {"id": f"c{i:03d}", "path": f"/c{i}.wav", "labels": [], "duration": 10.0, "split": s}
        for i, s in zip(range(50), ["train", "test"] * 25, strict=True)
    ]
    tasks = plan_shards(records, shard_size=1000, shard_mb=1.0, stats_clips=10)
    assigned = [r["id"] for t in tasks for r in t.records]
    assert sorted(assigned) == sorted(r["id"] for r in records)
    # 10 s of PCM16 at 16 kHz is 0.32 MB: three clips fit under 1 MB
    assert {len(t.records) for t in tasks} <= {1, 2, 3} and max(len(t.records) for t in tasks) == 3
    assert [t.name for t in tasks][:2] == ["test-000000", "test-000001"]
    assert sum(sum(t.for_stats) for t in tasks) == 10
    assert tasks == plan_shards(
        list(reversed(records)), shard_size=1000, shard_mb=1.0, stats_clips=10
    )


def test_stats_command_measures_the_fbank_of_the_shards(fsdd_subset: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    write_shards(prepare("fsdd", fsdd_subset, out), out, shard_size=16)
    stats = compute_stats(out)
    values = []
    with single_torch_thread():  # many small ops: threads only slow them down
        for clip in (c for tar in sorted(out.glob("*.tar")) for c in iter_shard(str(tar))):
            wave, sr = load_audio(clip.audio)
            values.append(
                wav_to_fbank(wave, sr, FbankConfig(target_length=None)).double().flatten()
            )
    every = torch.cat(values)
    assert stats["fbank_clips"] == SUBSET
    assert stats["fbank_mean"] == pytest.approx(every.mean().item(), rel=1e-6)
    assert stats["fbank_std"] == pytest.approx(every.std(unbiased=False).item(), rel=1e-5)
    assert json.loads((out / "stats.json").read_text())["fbank_mean"] == stats["fbank_mean"]


def test_loud_clip_is_clipped_not_wrapped(tmp_path: Path) -> None:
    src = tmp_path / "loud"
    src.mkdir()
    t = np.arange(16000) / 16000
    sf.write(
        src / "loud.wav",
        (1.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32),
        16000,
        subtype="FLOAT",
    )
    out = tmp_path / "shards"
    write_shards(prepare("unlabelled", src, out), out)
    (clip,) = list(iter_shard(str(out / "train-000000.tar")))
    wave, _ = load_audio(clip.audio)
    assert wave.max() > 0.99 and wave.min() < -0.99
    positive_half = wave[: 16000 // 400]  # first half period of 200 Hz: never negative
    assert (positive_half >= 0).all()


@pytest.mark.slow
def test_all_of_fsdd_shards_to_3000_clips_and_no_rejects(fsdd_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "fsdd"
    code = main(
        ["shard", "--corpus", "fsdd", "--src", str(fsdd_dir), "--out", str(out), "--workers", "2"]
    )
    assert code == 0
    stats = json.loads((out / "stats.json").read_text())
    assert stats["clips"] == 3000 and stats["rejects"] == 0
    assert stats["splits"] == {"test": 300, "train": 2700}
    ids = [m["id"] for m in _read_back(out)]
    assert len(ids) == len(set(ids)) == 3000
    assert -12 < stats["fbank_mean"] < -4 and 3 < stats["fbank_std"] < 7


def test_ids_that_differ_only_in_characters_a_key_cannot_hold_both_get_a_sample(
    tmp_path: Path,
) -> None:
    src = tmp_path / "clips"
    src.mkdir()
    t = np.arange(8000) / 16000
    for name in ("take.1.wav", "take_1.wav"):  # "." cannot be in a WebDataset key
        sf.write(src / name, (0.1 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 16000)
    out = tmp_path / "shards"
    stats = write_shards(prepare("unlabelled", src, out), out)
    assert stats["clips"] == 2 and stats["rejects"] == 0
    clips = list(iter_shard(str(out / "train-000000.tar")))
    assert {c.key: c.meta["id"] for c in clips} == {"take~2e1": "take.1", "take_1": "take_1"}


@pytest.mark.parametrize(
    ("option", "value"),
    [("--workers", "0"), ("--workers", "-1"), ("--shard-mb", "0"), ("--stats-clips", "0")],
)
def test_a_count_or_size_that_is_not_above_zero_is_refused_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    argv = ["--corpus", "folder", "--src", str(tmp_path), "--out", str(tmp_path / "out")]

    assert shard_main([*argv, option, value]) == 2

    assert capsys.readouterr().err == f"ssamba shard: {option} {value}: must be above 0\n"
    assert not (tmp_path / "out").exists()


def test_a_full_disk_while_writing_the_index_leaves_the_old_index(tmp_path: Path) -> None:
    """The process may write no file over 4 KiB (RLIMIT_FSIZE), as a full disk would stop it."""
    script = """
import resource, signal, sys
from pathlib import Path
from ssamba.data.shard_format import read_index, write_index
folder = Path(sys.argv[1])
write_index(folder, {"train": {"shards": [{"file": "train-000000.tar", "clips": 1}], "clips": 1}})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
many = [{"file": f"train-{i:06d}.tar", "clips": 1} for i in range(1000)]
try:
    write_index(folder, {"train": {"shards": many, "clips": 1000}})
except OSError:
    pass
print(read_index(folder))
"""
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True
    )

    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "{'train': [('train-000000.tar', 1)]}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.json"]
