"""`ssamba label-efficiency` on real FSDD clips: budgets, bad input, end to end.

A small shard folder (3 speakers x 10 digits x takes 0-1 and 5-9: 60 test clips of the
official split, 150 training clips, 15 per digit) keeps the runs to seconds; the
end-to-end test pretrains for a few steps and runs two leave-one-speaker-out folds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_datamodules import fsdd_clips, write_shard_folder

from ssamba import label_efficiency
from ssamba.features import FbankConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile

SPEAKERS = ["george", "jackson", "theo"]


@pytest.fixture(scope="module")
def clips(fsdd_dir: Path) -> dict[str, list]:
    return {
        "test": fsdd_clips(fsdd_dir, SPEAKERS, [0, 1]),
        "train": fsdd_clips(fsdd_dir, SPEAKERS, [5, 6, 7, 8, 9]),
    }


@pytest.fixture(scope="module")
def shards(clips: dict[str, list], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("le_shards")
    return write_shard_folder(folder, {"train": [clips["train"]], "test": [clips["test"]]})


@pytest.fixture(scope="module")
def encoder_file(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random SSAMBA over the recipe's 64 frames, as pretraining exports it."""
    torch.manual_seed(123)
    cfg = EncoderConfig(family="ssamba", depth=2, embed_dim=32, input_frames=64)
    features = FbankConfig(target_length=64, mean=-6.85, std=5.57, pad="floor")
    path = tmp_path_factory.mktemp("le_encoder") / "encoder.pt"
    return EncoderFile(AudioEncoder(cfg), features, provenance={"kind": "test"}).save(path)


def run(*args: str) -> int:
    return label_efficiency.main([*map(str, args), "--threads", "1"])


def test_both_inits_train_on_the_same_k_clips_per_class(shards, encoder_file, tmp_path):
    out = tmp_path / "out"
    code = run(
        "--shards", shards, "--encoder", encoder_file, "--out", out,
        "--labels-per-class", "1,5", "--seeds", "0,1", "--modes", "linear",
    )  # fmt: skip

    assert code == 0
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert len(runs) == 2 * 2 * 2  # budgets x seeds x inits
    draws: dict[tuple, set] = {}
    for r in runs:
        assert r["train_clips"] == 10 * r["labels_per_class"]
        assert 0.0 <= r["accuracy"] <= 1.0
        draws.setdefault((r["labels_per_class"], r["seed"]), set()).add(r["train_ids_sha"])
    assert all(len(shas) == 1 for shas in draws.values())  # pretrained and random alike
    assert draws[(5, 0)] != draws[(5, 1)]  # the seed draws other clips
    # the draw the command uses: k per class, nested in larger budgets, test never in it
    fold = label_efficiency.Fold("official", {"split": "test"})
    one, test = label_efficiency.train_ids(shards, fold, 1, seed=0)
    five, _ = label_efficiency.train_ids(shards, fold, 5, seed=0)
    assert set(one) < set(five) and not set(five) & set(test)
    assert sorted(i.split("_")[0] for i in five) == sorted([str(d) for d in range(10)] * 5)


def test_the_random_init_is_the_pretrained_architecture_with_other_weights(encoder_file):
    settings = label_efficiency.FinetuneSettings()
    build = label_efficiency.build_task
    pretrained = build(encoder_file, "pretrained", 0, "linear", settings, 10).encoder
    random_init = build(encoder_file, "random", 0, "linear", settings, 10).encoder

    assert pretrained.cfg == random_init.cfg
    state, other = pretrained.state_dict(), random_init.state_dict()
    assert any(not torch.equal(state[k], other[k]) for k in state)


@pytest.mark.parametrize(
    ("problem", "named"),
    [
        ("no_test_split", "no test split"),
        ("budget_too_large", "labels_per_class=16: classes with fewer"),
        ("unlabelled", "unlabelled shard folder"),
        ("loso_field", "--loso accent"),
        ("missing_encoder", "no such file"),
        ("negative_l2", "--probe-l2: -1.0"),
    ],
)
def test_bad_input_stops_with_one_line_before_any_training(
    problem, named, clips, shards, encoder_file, tmp_path, capsys
):
    folder, extra = shards, ["--encoder", encoder_file]
    if problem == "no_test_split":
        folder = write_shard_folder(tmp_path / "train_only", {"train": [clips["train"]]})
    elif problem == "budget_too_large":
        extra += ["--labels-per-class", "1,16"]  # 15 training clips per digit
    elif problem == "unlabelled":
        folder = write_shard_folder(tmp_path / "raw", {"train": [clips["train"]]}, classes=None)
    elif problem == "loso_field":
        extra += ["--loso", "accent"]
    elif problem == "negative_l2":
        extra += ["--probe-l2", "-1"]
    else:
        extra = ["--encoder", tmp_path / "nope.pt", "--labels-per-class", "1"]
    out = tmp_path / "out"

    code = run("--shards", folder, "--out", out, *extra)

    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err, err
    assert err.startswith("ssamba label-efficiency: error:")
    assert not out.exists()  # nothing was trained or written


@pytest.mark.slow
def test_pretrain_then_probe_and_finetune_leave_one_speaker_out(shards, tmp_path):
    # with the padding of short clips left out everywhere (the default path runs in
    # test_demo): pretraining's masks and losses, the probes' and fine-tunes' pooling
    out = tmp_path / "le"
    pretrain = (
        "--trainer.max_steps=6 --trainer.val_check_interval=6 --model.encoder.depth=2 "
        "--model.encoder.embed_dim=32 --data.batch_size=8 --data.val_max_clips=16 "
        "--data.num_workers=0 --model.image_every_n_steps=0 --trainer.enable_progress_bar=false "
        "--model.ignore_padding=true"
    )
    code = run(
        "--shards", shards, "--out", out, "--pretrain-args", pretrain, "--loso", "speaker",
        "--folds", "george,theo", "--labels-per-class", "1,all", "--seeds", "0",
        "--finetune-min-steps", "4", "--finetune-epochs", "1", "--ignore-padding",
    )  # fmt: skip

    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["options"]["ignore_padding"] is True
    assert Path(results["encoder"]).is_file() and str(out) in results["encoder"]
    runs = results["runs"]
    assert len(runs) == 2 * 2 * 2 * 2  # folds x budgets x inits x modes
    assert {r["fold"] for r in runs} == {"george", "theo"}
    assert {(r["init"], r["mode"]) for r in runs} == {
        (i, m) for i in ("pretrained", "random") for m in ("linear", "finetune")
    }
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in runs)
    # "all": every clip of the two other speakers (7 takes x 10 digits each)
    assert {r["train_clips"] for r in runs if r["labels_per_class"] is None} == {140}
    table = (out / "results.md").read_text()
    assert "| finetune | all |" in table and "leave-one-speaker-out" in table
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
