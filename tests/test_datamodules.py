"""The DataModules on real FSDD audio in data_prep's shard format.

The first part writes small shard folders (tars of `<key>.flac` + `<key>.json`,
index.json, labels.csv, stats.json) exactly as `data_prep.shard` does, but lets a test
pick shard sizes, folds and labels and plant corrupt samples; test_data_ddp.py reuses it.
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
import torch
import webdataset as wds
from jsonargparse import ArgumentParser

from data_prep.stats import duration_quantiles
from ssamba.audio import load_audio
from ssamba.data import LabelledDataModule, PretrainDataModule
from ssamba.features import DATASET_STATS, FeatureConfig

DIGITS = [str(d) for d in range(10)]


@dataclass
class FixtureClip:
    """One sample to write: key, audio bytes (flac unless planted otherwise) and its json
    (a dict, or the member's bytes as they are for crafted json)."""

    key: str
    audio: bytes | None
    meta: dict[str, Any] | bytes | None = field(default_factory=dict)


def flac_bytes(wave: torch.Tensor) -> bytes:
    buffer = io.BytesIO()
    sf.write(buffer, wave.numpy(), 16000, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def fsdd_clips(
    fsdd_dir: Path, speakers: Sequence[str], indices: Sequence[int]
) -> list[FixtureClip]:
    """Real FSDD recordings (every digit, the given take indices) at 16 kHz with json like
    data_prep's: `split` test for takes 0-4 (the official split), `fold` = take % 3 + 1."""
    clips = []
    for speaker in speakers:
        for index in indices:
            for digit in DIGITS:
                path = fsdd_dir / "recordings" / f"{digit}_{speaker}_{index}.wav"
                wave, _ = load_audio(path, 16000)
                meta = {
                    "id": path.stem,
                    "labels": [digit],
                    "duration": wave.numel() / 16000,
                    "source": str(path),
                    "split": "test" if index < 5 else "train",
                    "speaker": speaker,
                    "fold": index % 3 + 1,
                }
                clips.append(FixtureClip(path.stem, flac_bytes(wave), meta))
    return clips


def nan_wav_bytes() -> bytes:
    """A float WAV holding NaN samples: decodable, but not audio."""
    buffer = io.BytesIO()
    sf.write(buffer, np.full(16000, np.nan, dtype=np.float32), 16000, format="WAV", subtype="FLOAT")
    return buffer.getvalue()


def write_shard_folder(
    folder: Path,
    shards: dict[str, list[list[FixtureClip]]],
    classes: Sequence[str] | None = DIGITS,
) -> Path:
    """shards: split -> list of shards, each a list of clips. Returns `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    splits: dict[str, Any] = {}
    for split, split_shards in shards.items():
        entries = []
        for n, clips in enumerate(split_shards):
            name = f"{split}-{n:06d}.tar"
            with wds.TarWriter(str(folder / name)) as sink:
                for clip in clips:
                    sample: dict[str, Any] = {"__key__": clip.key}
                    if clip.audio is not None:
                        ext = "wav" if clip.audio.startswith(b"RIFF") else "flac"
                        sample[ext] = clip.audio
                    if isinstance(clip.meta, bytes):
                        sample["json"] = clip.meta
                    elif clip.meta is not None:
                        sample["json"] = json.dumps(clip.meta).encode()
                    sink.write(sample)
            entries.append({"file": name, "clips": len(clips)})
        splits[split] = {"shards": entries, "clips": sum(e["clips"] for e in entries)}
    (folder / "index.json").write_text(json.dumps({"sample_rate": 16000, "splits": splits}))
    mean, std = DATASET_STATS["speechcommands"]
    seconds = [
        float(clip.meta["duration"])
        for split_shards in shards.values()
        for clips in split_shards
        for clip in clips
        if isinstance(clip.meta, dict) and isinstance(clip.meta.get("duration"), (int, float))
    ]
    stats = {"fbank_mean": mean, "fbank_std": std, "durations": duration_quantiles(seconds)}
    (folder / "stats.json").write_text(json.dumps(stats))
    if classes is not None:
        rows = ["index,id,name", *(f"{i},{c},{c}" for i, c in enumerate(classes))]
        (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    return folder


def chunk(clips: list[FixtureClip], sizes: Sequence[int]) -> list[list[FixtureClip]]:
    """Cut clips into consecutive shards of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(clips[start : start + size])
        start += size
    return out


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def fsdd16(fsdd_dir: Path) -> list[FixtureClip]:
    """60 real FSDD clips: jackson then theo, takes 0, 1, 5 of each digit (folds 1, 2, 3)."""
    return fsdd_clips(fsdd_dir, ["jackson", "theo"], [0, 1, 5])


def ids_of(batches) -> list[str]:
    return [clip_id for batch in batches for clip_id in batch["id"]]


# --------------------------------------------------------------------------- pretraining


def test_validation_pass_reads_every_clip_exactly_once(tmp_path, fsdd16):
    # 3 uneven shards, 2 workers, batch 4: clips split over workers, none repeated or lost.
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [25, 20, 15])})
    dm = PretrainDataModule(
        sources=[{"shards": str(folder)}],
        val={"shards": str(folder)},
        batch_size=4,
        num_workers=2,
        features=FeatureConfig(target_length=32),
    )
    dm.setup("fit")
    loader = dm.val_dataloader()
    ids = ids_of(loader)
    assert sorted(ids) == sorted(c.key for c in fsdd16)
    assert len(loader) == 15
    assert ids == ids_of(loader), "validation order must not change between passes"


def test_stream_gives_steps_per_epoch_batches_of_normalised_fbank(tmp_path, fsdd16):
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})
    dm = PretrainDataModule(
        sources=[{"shards": str(folder)}],
        batch_size=6,
        steps_per_epoch=5,
        num_workers=2,
        shuffle_buffer=20,
        features=FeatureConfig(target_length=48, stats="shards"),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [list(loader), list(loader)]
    assert len(loader) == 5
    assert [len(e) for e in epochs] == [5, 5]
    batch = epochs[0][0]
    assert batch["fbank"].shape == (6, 48, 128) and batch["fbank"].dtype == torch.float32
    assert torch.isfinite(batch["fbank"]).all()
    # normalised with the folder's stats: values of order 1, not raw log-mel (~ -5 .. 5 * 2)
    assert batch["fbank"].abs().mean() < 2
    seen = set(ids_of(epochs[0] + epochs[1]))
    assert len(seen) > 30, "the stream should move through the shards, not repeat a few clips"
    # `frames` counts each clip's own frames: past it, only the padding's constant value
    frames = torch.cat([b["frames"] for b in epochs[0]])
    fbanks = torch.cat([b["fbank"] for b in epochs[0]])
    assert frames.dtype == torch.long and frames.min() > 0 and frames.max() <= 48
    assert (frames < 48).any()
    for fbank, own in zip(fbanks, frames.tolist(), strict=True):
        if own < 48:
            padding = fbank[own:]
            assert (padding == padding[:1]).all() and not (fbank[own - 1] == padding[0]).all()


def test_random_crop_takes_a_frame_aligned_window_of_long_clips(tmp_path, fsdd16):
    # A 1.5 s clip (3 FSDD clips joined) cropped to 40 frames must equal 40 consecutive
    # frames of the full clip's filterbank: the crop is exact, not an approximation.
    from ssamba.data.transforms import crop_wave
    from ssamba.features import FbankConfig, wav_to_fbank

    long = torch.cat([load_audio(io.BytesIO(c.audio).getvalue())[0] for c in fsdd16[:3]])
    cfg = FbankConfig(target_length=40)
    full = wav_to_fbank(long, 16000, FbankConfig(target_length=None))
    import random

    cropped = wav_to_fbank(crop_wave(long, cfg, "random", random.Random(3)), 16000, cfg)
    offsets = [
        o for o in range(full.shape[0] - 39) if torch.allclose(full[o : o + 40], cropped, atol=1e-3)
    ]
    assert offsets, "cropped filterbank is not a window of the full one"


def test_mixing_weights_set_the_share_of_each_source(tmp_path, fsdd16):
    a = write_shard_folder(tmp_path / "a", {"train": chunk(fsdd16[:30], [15, 15])})
    b = write_shard_folder(tmp_path / "b", {"train": chunk(fsdd16[30:], [30])})
    dm = PretrainDataModule(
        sources=[{"shards": str(a), "weight": 3.0}, {"shards": str(b), "weight": 1.0}],
        batch_size=20,
        steps_per_epoch=20,
        num_workers=1,
        shuffle_buffer=10,
        features=FeatureConfig(target_length=16, stats="asli"),  # two folders: no "shards"
    )
    dm.setup("fit")
    ids = ids_of(dm.train_dataloader())
    from_a = sum(clip_id.split("_")[1] == "jackson" for clip_id in ids) / len(ids)
    assert len(ids) == 400
    assert 0.68 < from_a < 0.82  # 0.75 expected; 400 draws give a std of ~0.02


def test_corrupt_clips_are_skipped_and_counted_not_fatal(tmp_path, fsdd16, caplog):
    caplog.set_level("WARNING")
    good = fsdd16[:12]
    bad = [
        FixtureClip("garbage", b"fLaC this is not a flac stream", {"id": "garbage", "labels": []}),
        FixtureClip("empty", b"", {"id": "empty", "labels": []}),
        FixtureClip("nan", nan_wav_bytes(), {"id": "nan", "labels": []}),
        FixtureClip("nojson", good[0].audio, None),
    ]
    folder = write_shard_folder(tmp_path / "s", {"train": [good[:6] + bad[:2], bad[2:] + good[6:]]})
    dm = PretrainDataModule(
        sources=[{"shards": str(folder)}],
        val={"shards": str(folder)},
        batch_size=4,
        steps_per_epoch=6,
        num_workers=2,
        features=FeatureConfig(target_length=16),
    )
    dm.setup("fit")
    val_ids = ids_of(dm.val_dataloader())
    assert sorted(val_ids) == sorted(c.key for c in good)
    # finite pass: each bad clip counted once, under its reason, in this (main) process
    assert dm.val_counter.totals() == {
        "undecodable": 1,
        "empty": 1,
        "non_finite": 1,
        "silent": 0,
        "bad_metadata": 1,
        "bad_shard": 0,
    }
    train_ids = ids_of(dm.train_dataloader())
    assert len(train_ids) == 24 and not {"garbage", "empty", "nan", "nojson"} & set(train_ids)
    assert sum(dm.train_counter.totals().values()) > 0, "worker counters must reach the trainer"
    assert sum(dm.skipped().values()) == 4 + sum(dm.train_counter.totals().values())
    assert "nojson: missing or unparsable .json" in caplog.text


def crafted_json_clips(audio: bytes) -> list[FixtureClip]:
    """Clips whose json a reader must refuse: 10,000 levels deep, and labels that are no
    list of strings (`5`, `[["zero"]]`)."""
    deep = b'{"id": "deep", "labels": ["1"], "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
    return [
        FixtureClip("deep", audio, deep),
        FixtureClip("labels5", audio, {"id": "labels5", "labels": 5}),
        FixtureClip("nested_labels", audio, {"id": "nested_labels", "labels": [["0"]]}),
    ]


def test_json_too_deep_or_with_labels_not_strings_is_skipped_and_counted(tmp_path, fsdd16, caplog):
    caplog.set_level("WARNING")
    good = fsdd16[:8]
    folder = write_shard_folder(
        tmp_path / "s", {"train": [good[:4] + crafted_json_clips(good[0].audio) + good[4:]]}
    )
    pretrain = PretrainDataModule(
        sources=[{"shards": str(folder)}], val={"shards": str(folder)}, batch_size=4,
        steps_per_epoch=2, num_workers=0, features=FeatureConfig(target_length=16),
    )  # fmt: skip
    pretrain.setup("fit")
    assert sorted(ids_of(pretrain.val_dataloader())) == sorted(c.key for c in good)
    assert pretrain.val_counter.totals()["bad_metadata"] == 3
    assert "deep: .json refused: nested 10001 levels deep" in caplog.text
    assert "labels5: .json refused: labels 5: not a string or a list of strings" in caplog.text
    labelled = LabelledDataModule(
        shards=str(folder), batch_size=4, num_workers=0, features=FeatureConfig(target_length=16),
        test_filter={"speaker": "theo"},
    )  # fmt: skip
    labelled.setup("fit")
    assert sorted(ids_of(labelled.train_dataloader())) == sorted(c.key for c in good)
    assert labelled.skipped()["bad_metadata"] == 3


def test_missing_folder_and_split_errors_name_them(tmp_path, fsdd16):
    with pytest.raises(FileNotFoundError, match=r"sources\[0\].*nowhere"):
        PretrainDataModule(sources=[{"shards": str(tmp_path / "nowhere")}])
    folder = write_shard_folder(tmp_path / "s", {"train": [fsdd16[:4]]})
    with pytest.raises(ValueError, match=r"valid.*splits present: \['train'\]"):
        PretrainDataModule(sources=[{"shards": str(folder), "splits": ["valid"]}])


# --------------------------------------------------------------------------- labelled


def labelled(folder: Path, **kwargs) -> LabelledDataModule:
    options = {"batch_size": 8, "num_workers": 2, "features": FeatureConfig(target_length=32)}
    options |= kwargs
    return LabelledDataModule(str(folder), **options)


@pytest.fixture
def fold_folder(tmp_path, fsdd16) -> Path:
    # data_prep writes cross-validation corpora (ESC-50) as one split "all" with a fold field
    return write_shard_folder(tmp_path / "folds", {"all": chunk(fsdd16, [20, 20, 20])})


def test_fold_k_tests_on_k_validates_on_the_next_and_trains_on_the_rest(fold_folder, fsdd16):
    dm = labelled(fold_folder, fold=3, val_fold="next")
    dm.setup("fit")
    dm.setup("test")
    fold_of = {c.key: c.meta["fold"] for c in fsdd16}
    test_ids, val_ids = ids_of(dm.test_dataloader()), ids_of(dm.val_dataloader())
    train_ids = ids_of(dm.train_dataloader())
    assert {fold_of[i] for i in test_ids} == {3} and len(test_ids) == sum(
        f == 3 for f in fold_of.values()
    )
    assert {fold_of[i] for i in val_ids} == {1}, "the fold after the last wraps to the first"
    assert {fold_of[i] for i in train_ids} == {2}
    assert len(train_ids) == len(dm.train_dataloader()) * 8  # drop_last: whole batches only


def test_val_fold_test_validates_on_the_test_fold_like_ssast_esc50(fold_folder):
    dm = labelled(fold_folder, fold=2, val_fold="test")
    dm.setup("fit")
    dm.setup("test")
    assert sorted(ids_of(dm.val_dataloader())) == sorted(ids_of(dm.test_dataloader()))
    assert not set(ids_of(dm.train_dataloader())) & set(ids_of(dm.test_dataloader()))


def test_missing_fold_error_names_it_and_the_folds_present(fold_folder):
    dm = labelled(fold_folder, fold=7)
    with pytest.raises(
        ValueError, match=r"fold: fold 7 does not exist.*folds present: \[1, 2, 3\]"
    ):
        dm.setup("fit")


def test_leave_one_speaker_out_from_a_json_predicate(tmp_path, fsdd16):
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})
    dm = labelled(folder, test_filter={"speaker": "theo"}, num_workers=0)
    dm.setup("fit")
    dm.setup("test")
    assert {i.split("_")[1] for i in ids_of(dm.test_dataloader())} == {"theo"}
    assert len(ids_of(dm.test_dataloader())) == 30
    assert {i.split("_")[1] for i in ids_of(dm.train_dataloader())} == {"jackson"}
    assert dm.val_dataloader() == []  # no val_filter: no validation


def test_empty_subset_error_names_the_predicate_and_values_present(tmp_path, fsdd16):
    folder = write_shard_folder(tmp_path / "s", {"train": [fsdd16[:30]]})
    dm = labelled(folder, val_filter={"split": "valid"})
    with pytest.raises(
        ValueError,
        match=r"val set \(\{'split': 'valid'\}\) matches no clip.*split: \['test', 'train'\]",
    ):
        dm.setup("fit")


def test_label_outside_the_label_map_names_clip_and_label(tmp_path, fsdd16):
    clips = [FixtureClip(c.key, c.audio, dict(c.meta)) for c in fsdd16[:8]]
    clips[5].meta["labels"] = ["eleven"]
    folder = write_shard_folder(tmp_path / "s", {"train": [clips]})
    with pytest.raises(ValueError, match=rf"clip '{clips[5].key}' has label 'eleven'.*labels.csv"):
        labelled(folder).setup("fit")


def test_single_label_batches_are_one_hot_and_mixup_mixes_targets(tmp_path, fsdd16):
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})
    plain = labelled(folder, test_filter={"speaker": "theo"})
    plain.setup("test")
    batch = next(iter(plain.test_dataloader()))
    assert plain.num_classes == 10 and plain.class_names == DIGITS
    assert batch["target"].shape == (8, 10) and torch.equal(batch["target"].sum(1), torch.ones(8))
    assert batch["label"].tolist() == [int(i[0]) for i in batch["id"]]
    mixed = labelled(
        folder, test_filter={"speaker": "theo"}, mixup=1.0, freqm=8, timem=8, noise=True
    )
    mixed.setup("fit")
    batch = next(iter(mixed.train_dataloader()))
    assert torch.allclose(batch["target"].sum(1), torch.ones(8))
    blended = (batch["target"] > 0).sum(1) == 2  # unless a clip drew a same-digit partner
    assert blended.float().mean() > 0.5
    assert batch["label"].tolist() == batch["target"].argmax(1).tolist()


def test_multi_label_batches_are_multi_hot_with_label_minus_one(tmp_path, fsdd16):
    clips = [FixtureClip(c.key, c.audio, dict(c.meta)) for c in fsdd16[:16]]
    for clip in clips[::2]:
        clip.meta["labels"] = (
            [clip.meta["labels"][0], "9"] if clip.meta["labels"][0] != "9" else ["9"]
        )
    folder = write_shard_folder(tmp_path / "s", {"train": [clips]})
    dm = labelled(folder, test_filter={"speaker": "jackson"})
    dm.setup("test")
    batches = list(dm.test_dataloader())
    assert dm.multi_label
    target = torch.cat([b["target"] for b in batches])
    assert set(target.unique().tolist()) == {0.0, 1.0} and (target.sum(1) == 2).any()
    assert (torch.cat([b["label"] for b in batches]) == -1).all()


def test_training_reshuffles_every_epoch_and_evaluation_never(tmp_path, fsdd16):
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})
    dm = labelled(folder, test_filter={"speaker": "theo"}, batch_size=6)  # 30 clips: none dropped
    dm.setup("fit")
    dm.setup("test")
    first, second = ids_of(dm.train_dataloader()), ids_of(dm.train_dataloader())
    assert sorted(first) == sorted(second) and first != second
    assert ids_of(dm.test_dataloader()) == ids_of(dm.test_dataloader())


# --------------------------------------------------------------------------- config


def test_datamodules_build_from_a_yaml_recipe_through_jsonargparse(tmp_path, fsdd16):
    # LightningCLI builds `data:` the same way (parser_mode="omegaconf")
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"labelled:\n  shards: {folder}\n  test_filter: {{speaker: theo}}\n  val_fold: next\n"
        f"  features: {{stats: [-6.8, 5.5]}}\n  mixup: 0.6\n"
        f"pretrain:\n  sources:\n    - {{shards: {folder}, weight: 2.0, splits: [train]}}\n"
        f"  val: {{shards: {folder}}}\n  steps_per_epoch: 10\n"
    )
    parser = ArgumentParser(parser_mode="omegaconf")
    parser.add_argument("--config", action="config")
    parser.add_class_arguments(LabelledDataModule, "labelled")
    parser.add_class_arguments(PretrainDataModule, "pretrain")
    built = parser.instantiate(parser.parse_args(["--config", str(recipe)]))
    assert built.labelled.fbank.mean == -6.8 and built.labelled.hparams.mixup == 0.6
    assert built.labelled.hparams.test_filter == {"speaker": "theo"}
    assert built.pretrain.weights == [2.0]
    help_text = parser.format_help()  # argument docstrings become --help
    assert "shard sets to mix" in help_text and "leave-one-speaker-out" not in help_text
    assert "json predicate of the test set" in help_text


def test_label_budget_draws_exactly_k_clips_per_class_the_same_for_every_model(tmp_path, fsdd16):
    # fsdd16: 2 speakers x 10 digits x 3 takes = 6 clips per digit, none of them test
    folder = write_shard_folder(tmp_path / "s", {"train": chunk(fsdd16, [30, 30])})

    def train_ids(k: int, seed: int = 0) -> list[str]:
        dm = labelled(folder, labels_per_class=k, budget_seed=seed, test_filter={"speaker": "x"})
        dm.split_clips("fit")
        return sorted(c.meta["id"] for c in dm.subsets["train"])

    for k in (1, 2, 5):
        ids = train_ids(k)
        digits = [i.split("_")[0] for i in ids]
        assert len(ids) == 10 * k and all(digits.count(d) == k for d in set(digits))
        assert ids == train_ids(k)  # the same draw for a second model (e.g. random init)
    assert set(train_ids(2)) <= set(train_ids(5))  # smaller budgets are nested in larger
    assert train_ids(2, seed=1) != train_ids(2, seed=0)
    dm = labelled(folder, labels_per_class=7, test_filter={"speaker": "x"})
    with pytest.raises(ValueError, match=r"labels_per_class=7: classes with fewer .*'0' \(6\)"):
        dm.split_clips("fit")
