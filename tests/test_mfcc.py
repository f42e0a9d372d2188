"""MFCC-grams end to end: features -> encoder input size -> encoder file, their own
normalisation statistics, and the errors for features that do not fit the encoder."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer

from data_prep.__main__ import main as data_prep_main
from data_prep.stats import compute_stats, raw_features
from ssamba.audio import load_audio
from ssamba.data.labelled import LabelledDataModule
from ssamba.data.shards import iter_shard
from ssamba.features import FbankConfig, FeatureConfig, clip_features, wav_to_fbank
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.models.official import CheckpointError
from ssamba.tasks.classify import ClassifyTask, check_features

CEPS, FRAMES = 20, 32
MFCC = FbankConfig(target_length=FRAMES, kind="mfcc", num_ceps=CEPS, mean=-13.2, std=41.5)


def frame_encoder(**overrides) -> AudioEncoder:
    """SSAST's frame model over MFCC-grams: one patch = all cepstra of 2 frames."""
    torch.manual_seed(0)
    cfg = EncoderConfig(
        family="ssamba",
        embed_dim=32,
        depth=2,
        num_mel_bins=CEPS,
        input_frames=FRAMES,
        patch=(CEPS, 2),
        **overrides,
    )
    return AudioEncoder(cfg).eval()


@pytest.fixture(scope="module")
def mfcc_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 real FSDD clips of digits 0-2 (train: recordings 5-8, test: 0-3) as shards."""
    root = tmp_path_factory.mktemp("mfcc")
    listing = root / "clips.csv"
    with listing.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split"])
        for digit in range(3):
            for index, split in [
                (5, "train"),
                (6, "train"),
                (7, "train"),
                (8, "train"),
                (0, "test"),
                (1, "test"),
                (2, "test"),
                (3, "test"),
            ]:
                wav = fsdd_dir / "recordings" / f"{digit}_jackson_{index}.wav"
                writer.writerow([wav, digit, split])
    out = root / "shards"
    args = ["shard", "--corpus", "manifest", "--src", str(listing), "--out", str(out)]
    assert data_prep_main(args) == 0
    return out


def test_mfcc_of_real_speech_reaches_the_frame_encoder_with_num_ceps_bins(fsdd_dir):
    wave, sr = load_audio(fsdd_dir / "recordings" / "3_theo_10.wav")
    feats = clip_features(wave, sr, MFCC, train=False)
    assert feats.shape == (FRAMES, CEPS)
    encoder = frame_encoder()
    assert encoder.grid == (1, FRAMES // 2)  # frame patches: one row of time slices
    assert encoder(feats[None]).shape == (1, 32)
    with pytest.raises(ValueError, match=f"mel_bins={CEPS}"):
        encoder(torch.zeros(1, FRAMES, 128))  # a filterbank does not fit


def test_encoder_file_records_mfcc_features_and_refuses_a_mismatch(tmp_path):
    path = EncoderFile(frame_encoder(), MFCC).save(tmp_path / "mfcc.pt")
    bundle = load_encoder_file(path)
    assert bundle.features.kind == "mfcc" and bundle.features.num_ceps == CEPS
    assert bundle.features.feature_dim == bundle.encoder.cfg.num_mel_bins == CEPS
    with pytest.raises(
        CheckpointError, match=f"features give 128 bins per frame but the encoder reads {CEPS}"
    ):
        EncoderFile(frame_encoder(), FbankConfig(target_length=FRAMES))


def test_mfcc_stats_are_measured_apart_from_the_fbank_ones(mfcc_shards):
    fbank_before = compute_stats(mfcc_shards)["fbank_mean"]
    stats = compute_stats(mfcc_shards, kind="mfcc", num_ceps=CEPS)
    assert stats["fbank_mean"] == pytest.approx(fbank_before)  # kept
    assert stats["mfcc_num_ceps"] == CEPS and stats["mfcc_clips"] == 24
    # The same moments computed directly from the clips.
    values = []
    for tar in sorted(Path(mfcc_shards).glob("*.tar")):
        for clip in iter_shard(str(tar)):
            wave, sr = load_audio(clip.audio, name=clip.key)
            values.append(wav_to_fbank(wave, sr, raw_features("mfcc", CEPS)).double().flatten())
    every = torch.cat(values)
    assert stats["mfcc_mean"] == pytest.approx(float(every.mean()), rel=1e-6)
    assert stats["mfcc_std"] == pytest.approx(float(every.std(unbiased=False)), rel=1e-6)
    assert not math.isclose(stats["mfcc_mean"], stats["fbank_mean"])


def test_finetuning_on_mfcc_data_runs_and_wrong_features_are_refused(mfcc_shards, tmp_path):
    init = EncoderFile(frame_encoder(), MFCC).save(tmp_path / "mfcc.pt")
    data = LabelledDataModule(
        str(mfcc_shards),
        batch_size=4,
        num_workers=0,
        features=FeatureConfig(
            kind="mfcc", num_ceps=CEPS, target_length=FRAMES, stats=(-13.2, 41.5)
        ),
    )
    task = ClassifyTask(num_classes=data.num_classes, init=str(init), input_frames=FRAMES)
    trainer = Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=data)
    batch = next(iter(data.test_dataloader()))
    assert batch["fbank"].shape[1:] == (FRAMES, CEPS)
    assert task(batch["fbank"]).shape == (len(batch["label"]), 3)

    fbank = FbankConfig(target_length=FRAMES)
    with pytest.raises(
        ValueError, match=r"trained on mfcc features .* set data\.features\.kind mfcc"
    ):
        check_features(fbank, MFCC, CEPS)
    with pytest.raises(ValueError, match=r"data\.features\.stats: 'shards' gives the filterbank"):
        check_features(MFCC, MFCC, CEPS, stats="shards")
    with pytest.raises(
        ValueError, match=r"model\.encoder\.num_mel_bins to data\.features\.num_ceps"
    ):
        check_features(MFCC, None, 128)
