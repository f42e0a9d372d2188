"""`ssamba label-efficiency` on real FSDD clips: the protocol, the draws, the probe, bad
input, end to end.

A small shard folder (3 speakers x 10 digits x takes 0-1 and 5-9: 60 test clips of the
official split, 150 training clips, 15 per digit) keeps the runs to seconds; the
end-to-end test pretrains for a few steps on two speakers and tests on the third.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
import yaml
from test_datamodules import FixtureClip, fsdd_clips, write_shard_folder

from ssamba import label_efficiency
from ssamba.data.labelled import draw_per_class
from ssamba.data.pretrain import PretrainDataModule
from ssamba.data.shards import SkipCounter, catalogue, list_shards
from ssamba.features import FbankConfig, FeatureConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.tasks.probe import linear_probe

SPEAKERS = ["george", "jackson", "theo"]


# a seconds-long pretraining of a two-block, width-32 encoder: what label-efficiency does
# with it is under test, not what it learns
TINY_PRETRAIN = (
    "--trainer.max_steps=6 --trainer.val_check_interval=6 --model.encoder.depth=2 "
    "--model.encoder.embed_dim=32 --data.batch_size=8 --data.val_max_clips=16 "
    "--data.num_workers=0 --model.image_every_n_steps=0 --trainer.enable_progress_bar=false"
)


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


def run_pretraining_per_speaker(shards: Path, out: Path, *args: str) -> dict:
    """The tool on `shards` with the seconds-long pretraining, speakers held out; it must
    succeed. Returns its results.json."""
    code = run(
        "--shards", shards, "--out", out, "--pretrain-args", TINY_PRETRAIN, "--loso", "speaker",
        *args,
    )  # fmt: skip
    assert code == 0
    return json.loads((out / "run-1" / "results.json").read_text())


def options(*args: str) -> label_efficiency.argparse.Namespace:
    return label_efficiency.build_parser().parse_args(["--shards", "s", *args])


def test_every_init_trains_on_the_draw_recomputed_from_the_data(shards, encoder_file, tmp_path):
    code = run(
        "--shards", shards, "--encoder", encoder_file, "--out", tmp_path,
        "--labels-per-class", "1,5", "--seeds", "0,1", "--modes", "linear",
    )  # fmt: skip

    assert code == 0
    results = json.loads((tmp_path / "run-1" / "results.json").read_text())
    # the draw, recomputed from the shards: k clips per digit of the training split
    stored = catalogue(list_shards(shards), SkipCounter(0))
    pool = [c.meta for c in stored if c.meta["split"] == "train"]
    test_ids = {c.meta["id"] for c in stored if c.meta["split"] == "test"}
    runs = results["runs"]
    assert {r["init"] for r in runs} == {"pretrained", "random", "fbank-stats"}
    assert len(runs) == 2 * 2 * 3  # budgets x seeds x inits
    for r in runs:
        k, seed = r["labels_per_class"], r["seed"]
        draw = draw_per_class([m["id"] for m in pool], [m["labels"] for m in pool], k, seed)
        assert sorted(r["train_ids"]) == sorted(draw), (r["init"], k, seed)
        assert sorted(i.split("_")[0] for i in r["train_ids"]) == sorted(
            [str(d) for d in range(10)] * k
        )
        assert not set(r["train_ids"]) & test_ids
    by_draw = {(r["labels_per_class"], r["seed"]): set(r["train_ids"]) for r in runs}
    assert by_draw[(1, 0)] < by_draw[(5, 0)] and by_draw[(5, 0)] != by_draw[(5, 1)]
    (fold,) = results["folds"]
    assert fold["name"] == "official" and set(fold["test_ids"]) == test_ids
    assert fold["pretraining_ids"] is None  # --encoder: what it was pretrained on is unknown
    # each cell's ± is the spread of its two seeds' accuracies (two draws can tie on 60
    # test clips, so a zero is possible; a missing spread is not)
    for row in results["summary"]:
        for init in ("pretrained", "random", "fbank-stats"):
            cell = (init, row["labels_per_class"])
            accs = [r["accuracy"] for r in runs if (r["init"], r["labels_per_class"]) == cell]
            assert row[init]["n"] == 2
            assert row[init]["std"] == pytest.approx(statistics.stdev(accs))
    assert "fbank-stats" in (tmp_path / "run-1" / "results.md").read_text()
    # a second run into the same --out writes a new folder, the first stays
    assert run("--shards", shards, "--encoder", encoder_file, "--out", tmp_path,
               "--labels-per-class", "1", "--seeds", "0", "--modes", "linear") == 0  # fmt: skip
    assert (tmp_path / "run-2" / "results.json").is_file()
    assert json.loads((tmp_path / "run-1" / "results.json").read_text()) == results


def test_dev_rotate_with_an_encoder_file_reads_every_fold_with_it(shards, encoder_file, tmp_path):
    code = run(
        "--shards", shards, "--encoder", encoder_file, "--out", tmp_path, "--loso", "speaker",
        "--dev-rotate", "--labels-per-class", "1", "--seeds", "0", "--modes", "linear",
    )  # fmt: skip

    assert code == 0
    results = json.loads((tmp_path / "run-1" / "results.json").read_text())
    assert [f["name"] for f in results["folds"]] == ["george", "jackson"]
    assert {f["encoder"] for f in results["folds"]} == {results["encoder"]}
    assert results["encoder"] == str(encoder_file.resolve())
    assert not (tmp_path / "run-1" / "pretrain").exists()  # nothing was pretrained


def test_the_pretrained_init_holds_the_files_weights(encoder_file):
    settings = label_efficiency.FinetuneSettings()
    build = label_efficiency.build_task
    stored = load_encoder_file(encoder_file).encoder.state_dict()
    pretrained = build(encoder_file, "pretrained", 0, "linear", settings, 10).encoder.state_dict()
    random_init = build(encoder_file, "random", 0, "linear", settings, 10).encoder.state_dict()

    assert pretrained.keys() == stored.keys()
    assert all(torch.equal(pretrained[k], stored[k]) for k in stored)
    # the random init draws new weights where initialisation is random (Mamba's A and D
    # start from fixed values in both)
    assert not torch.equal(
        random_init["patch_embed.proj.weight"], stored["patch_embed.proj.weight"]
    )
    assert not torch.equal(random_init["pos_embed"], stored["pos_embed"])


def blobs(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """10 well-separated classes in 16 dimensions: (n, 16), labels (n,)."""
    centres = torch.randn(10, 16, generator=generator) * 4
    labels = torch.arange(n) % 10
    return centres[labels] + torch.randn(n, 16, generator=generator), labels


def test_the_probe_separates_separable_classes_and_not_shuffled_labels():
    x, y = blobs(400, torch.Generator().manual_seed(0))
    train, test = slice(0, 200), slice(200, 400)
    probe = linear_probe

    assert probe(x[train], y[train], x[test], y[test], 10, 1e-3) >= 0.95
    shuffled = y[torch.randperm(400, generator=torch.Generator().manual_seed(1))]
    assert probe(x[train], shuffled[train], x[test], shuffled[test], 10, 1e-3) <= 0.2


def test_the_probe_standardises_with_the_training_rows_only():
    # Feature a is clean, b noisy; both say the class. Test row 0 is class 1 by a and
    # class 0 by b; the other test rows have a = 1000. With the training rows' statistics a
    # keeps its scale and wins. Statistics that included the test rows would inflate a's
    # std ~400x, so that, under the L2 penalty, a counts for nothing and b misreads row 0.
    generator = torch.Generator().manual_seed(0)
    train_y = torch.arange(20) % 2
    sign = 2.0 * train_y - 1
    clean = sign + 0.05 * torch.randn(20, generator=generator)
    noisy = sign + 0.8 * torch.randn(20, generator=generator)
    test_x = torch.tensor([[1.0, -1.0]] + [[1000.0, 1.0]] * 8)
    test_y = torch.ones(9, dtype=torch.long)

    accuracy = linear_probe(torch.stack([clean, noisy], 1), train_y, test_x, test_y, 2, 1e-2)

    assert accuracy == 1.0  # 8 / 9 when the test rows' statistics leak in (checked)


def test_fbank_stats_reads_each_clips_own_frames():
    fbank = torch.randn(2, 8, 3)
    frames = torch.tensor([5, 8])
    features = label_efficiency.Features(fbank, frames, torch.tensor([0, 1]), ["a", "b"], 2)

    stats = label_efficiency.fbank_stats_features(features)

    assert stats.shape == (2, 6)
    own = fbank[0, :5]
    assert torch.allclose(stats[0], torch.cat([own.mean(0), own.std(0, unbiased=False)]))
    fbank[0, 5:] = 1e6  # padding changes nothing
    assert torch.allclose(label_efficiency.fbank_stats_features(features)[0], stats[0])


def test_each_pretrainings_mean_is_listed_in_the_footnotes_order_of_seeds():
    """Runs of pretraining seed 4 before seed 3 (as `--pretrain-seeds 4,3` gives them): the
    last column follows the footnote's seeds, and each mean is its own pretraining's."""
    accuracy = {(4, 0): 0.2, (4, 1): 0.4, (3, 0): 0.6, (3, 1): 0.7}  # (pretraining, probe seed)
    runs = [
        label_efficiency.Run("pretrained", "linear", 5, seed, "theo", acc, 50, [], 0.0, pseed)
        for (pseed, seed), acc in accuracy.items()
    ]
    runs += [
        label_efficiency.Run(init, "linear", 5, seed, "theo", 0.1, 50, [], 0.0)
        for init in ("random", "fbank-stats")
        for seed in (0, 1)
    ]

    (row,) = label_efficiency.summarise(runs)
    each = {e["pretrain_seed"]: e["mean"] for e in row["pretrained"]["per_pretraining"]}
    assert each == pytest.approx({4: 0.3, 3: 0.65})
    assert row["pretrained"]["mean"] == pytest.approx(0.475) and row["pretrained"]["n"] == 4
    table = label_efficiency.format_table([row], "held-out", 1.0, 2, [3, 4])
    assert "pretraining seeds 3, 4" in table
    assert table.splitlines()[2].endswith("| 65.0 / 30.0 |")


def test_held_out_groups_are_neither_pretrained_nor_trained_on(shards):
    clips = label_efficiency.read_catalogue(shards)
    speaker = {i: i.split("_")[1] for i in clips.ids}

    reported = label_efficiency.plan_protocol(clips, options("--loso", "speaker"))
    dev = label_efficiency.plan_protocol(
        clips, options("--loso", "speaker", "--dev-groups", "jackson")
    )

    assert [f.name for f in reported.folds] == ["theo"]  # the last third by default
    fold = reported.folds[0]
    assert {speaker[i] for i in fold.test_ids} == {"theo"} and len(fold.test_ids) == 70
    assert {speaker[i] for i in fold.pretraining_ids} == {"george", "jackson"}
    assert set(fold.train_ids) == set(fold.pretraining_ids)
    assert "held-out speaker theo" in reported.description
    assert [f.name for f in dev.folds] == ["jackson"]
    assert {speaker[i] for i in dev.folds[0].pretraining_ids} == {"george"}  # theo is not read
    assert {speaker[i] for i in dev.folds[0].train_ids} == {"george"}


def test_dev_rotate_tests_each_development_group_with_its_own_pretraining(shards):
    clips = label_efficiency.read_catalogue(shards)
    speaker = {i: i.split("_")[1] for i in clips.ids}

    protocol = label_efficiency.plan_protocol(clips, options("--loso", "speaker", "--dev-rotate"))

    assert [f.name for f in protocol.folds] == ["george", "jackson"]  # theo stays held out
    for fold, other in zip(protocol.folds, ["jackson", "george"], strict=True):
        assert {speaker[i] for i in fold.test_ids} == {fold.name}
        assert {speaker[i] for i in fold.train_ids} == {other}
        assert set(fold.pretraining_ids) == set(fold.train_ids)
    pools = protocol.pretraining_pools()
    assert [[f.name for f in folds] for folds in pools.values()] == [["george"], ["jackson"]]
    assert "in turn" in protocol.description


def test_pretraining_validates_on_its_own_clips_never_on_a_test_clip(shards):
    clips = label_efficiency.read_catalogue(shards)
    args = options("--loso", "speaker")
    protocol = label_efficiency.plan_protocol(clips, args)
    (pool,) = protocol.pretraining_pools()

    sources, val, read = label_efficiency.pretrain_sources(args, pool)

    tested = {i for fold in protocol.folds for i in fold.test_ids}
    trained = set(sources[0]["ids"])
    assert val["ids"] and set(val["ids"]) <= set(pool)
    assert not set(val["ids"]) & tested and not set(val["ids"]) & trained
    assert trained | set(val["ids"]) == set(read) == set(pool)


def test_pretrain_extra_adds_every_clip_of_other_folders_beside_the_protocol_s(
    clips, shards, tmp_path
):
    other = write_shard_folder(tmp_path / "other", {"train": [clips["train"][:4]]}, classes=None)
    catalogue_ = label_efficiency.read_catalogue(shards)
    args = label_efficiency.build_parser().parse_args(
        ["--shards", str(shards), "--loso", "speaker", "--pretrain-extra", str(other)]
    )
    (pool,) = label_efficiency.plan_protocol(catalogue_, args).pretraining_pools()

    sources, val, read = label_efficiency.pretrain_sources(args, pool)

    assert [s["shards"] for s in sources] == [str(shards.resolve()), str(other.resolve())]
    assert "ids" not in sources[1]  # every clip of the extra folder, an equal share
    assert set(sources[0]["ids"]) | set(val["ids"]) == set(pool)
    assert set(val["ids"]) <= set(pool)  # validated on the protocol's
    assert len(read) == len(pool) + 4


def test_pretraining_reads_only_the_listed_clips(shards):
    wanted = [f"{d}_george_5" for d in range(10)]
    val = ["3_theo_6", "4_theo_6"]
    data = PretrainDataModule(
        [{"shards": str(shards), "ids": wanted}],
        val={"shards": str(shards), "ids": val},
        batch_size=4,
        steps_per_epoch=6,
        num_workers=0,
        features=FeatureConfig(target_length=64, stats=(-6.85, 5.57)),
    )
    data.setup("fit")

    batches = iter(data.train_dataloader())
    seen = {i for _ in range(6) for i in next(batches)["id"]}
    assert seen and seen <= set(wanted)
    assert [i for batch in data.val_dataloader() for i in batch["id"]] == val
    with pytest.raises(ValueError, match=r"sources\[0\]\.ids: 1 of 1 ids .*'nope'"):
        PretrainDataModule(
            [{"shards": str(shards), "ids": ["nope"]}], features=FeatureConfig(stats=(0.0, 1.0))
        )


@pytest.mark.parametrize("option", ["--pretrain-shards", "--pretrain-extra"])
@pytest.mark.parametrize("renamed", [True, False], ids=["test-audio-renamed", "labelled-folder"])
def test_pretrain_shards_holding_test_audio_are_refused_before_training(
    renamed, option, clips, shards, tmp_path, capsys
):
    if renamed:  # one test clip's audio under another id, among training clips
        test_clip = clips["test"][7]
        copy = FixtureClip("other_name", test_clip.audio, {**test_clip.meta, "id": "other_name"})
        folder = write_shard_folder(tmp_path / "raw", {"train": [[*clips["train"][:5], copy]]})
    else:
        folder = shards  # the labelled folder itself, all its splits
    out = tmp_path / "out"

    code = run("--shards", shards, option, folder, "--out", out, "--labels-per-class", "1")

    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"{option} {folder}" in err, err
    if renamed:
        assert "1 of its clips are test clips" in err and "'other_name'" in err, err
        assert f"test clip {clips['test'][7].key!r}" in err
    else:
        assert "60 of its clips are test clips" in err, err
    assert not out.exists()  # nothing was trained or written


@pytest.mark.parametrize(
    ("problem", "named"),
    [
        ("no_test_split", "no test split"),
        ("budget_too_large", "labels_per_class=16: classes with fewer"),
        ("unlabelled", "unlabelled shard folder"),
        ("loso_field", "--loso accent"),
        ("heldout_unknown", "--heldout: ['nobody']"),
        ("dev_is_heldout", "--dev-groups: ['theo'] are held out"),
        ("rotate_without_loso", "--dev-rotate need --loso"),
        ("rotate_one_group", "no speaker is left to train on"),
        ("missing_encoder", "no such file"),
        ("negative_l2", "--probe-l2: -1.0"),
        ("pretrain_seeds_with_encoder", "--pretrain-seeds: --encoder names a trained"),
        ("pretrain_seeds_not_integers", "--pretrain-seeds"),
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
    elif problem == "heldout_unknown":
        extra += ["--loso", "speaker", "--heldout", "nobody"]
    elif problem == "dev_is_heldout":
        extra += ["--loso", "speaker", "--dev-groups", "theo"]
    elif problem == "rotate_without_loso":
        extra += ["--dev-rotate"]
    elif problem == "rotate_one_group":  # theo and jackson held out: george has no peer
        extra += ["--loso", "speaker", "--heldout", "theo,jackson", "--dev-rotate"]
    elif problem == "negative_l2":
        extra += ["--probe-l2", "-1"]
    elif problem == "pretrain_seeds_with_encoder":
        extra += ["--pretrain-seeds", "0,1"]
    elif problem == "pretrain_seeds_not_integers":
        extra = ["--pretrain-seeds", "0,one"]
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
def test_pretrain_on_the_other_speakers_then_probe_and_finetune_the_held_out_one(shards, tmp_path):
    # with the padding of short clips left out of the probes' and fine-tunes' pooling
    # (the default path runs in test_demo)
    out = tmp_path / "le"
    results = run_pretraining_per_speaker(
        shards, out,
        "--labels-per-class", "1,all", "--seeds", "0", "--finetune-min-steps", "4",
        "--finetune-epochs", "1", "--ignore-padding", "--pooling", "stats",
    )  # fmt: skip

    assert results["options"]["ignore_padding"] is True
    assert Path(results["encoder"]).is_file() and str(out) in results["encoder"]
    (fold,) = results["folds"]
    assert fold["name"] == "theo" and len(fold["test_ids"]) == 70
    assert {i.split("_")[1] for i in fold["pretraining_ids"]} == {"george", "jackson"}
    assert not set(fold["test_ids"]) & set(fold["pretraining_ids"])
    runs = results["runs"]
    assert {(r["init"], r["mode"]) for r in runs} == {
        *((i, m) for i in ("pretrained", "random") for m in ("linear", "finetune")),
        ("fbank-stats", "linear"),
    }
    assert len(runs) == 2 * 5  # budgets x (init, mode)
    # "all": every clip of the two other speakers (7 takes x 10 digits each)
    assert {r["train_clips"] for r in runs if r["labels_per_class"] is None} == {140}
    table = (out / "run-1" / "results.md").read_text()
    assert "| finetune | all |" in table and "held-out speaker theo" in table
    assert (out / "run-1" / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_dev_rotate_pretrains_once_per_fold_on_the_other_groups_only(shards, tmp_path):
    out = tmp_path / "le"
    results = run_pretraining_per_speaker(
        shards, out,
        "--dev-rotate", "--modes", "linear", "--labels-per-class", "1", "--seeds", "0",
    )  # fmt: skip

    folds = {f["name"]: f for f in results["folds"]}
    assert set(folds) == {"george", "jackson"}
    for name, other in (("george", "jackson"), ("jackson", "george")):
        fold = folds[name]
        assert {i.split("_")[1] for i in fold["pretraining_ids"]} == {other}
        assert Path(fold["encoder"]).is_file() and f"pretrain-{name}" in fold["encoder"]
    assert results["encoder"] is None  # two encoders, one per fold
    assert {r["fold"] for r in results["runs"]} == {"george", "jackson"}
    assert "in turn" in (out / "run-1" / "results.md").read_text()


@pytest.mark.slow
def test_pretrain_seeds_pretrain_once_each_and_average_the_pretrained_rows(shards, tmp_path):
    out = tmp_path / "le"
    results = run_pretraining_per_speaker(
        shards, out,
        "--modes", "linear", "--labels-per-class", "1,all", "--seeds", "0,1",
        "--pretrain-seeds", "3,4",
    )  # fmt: skip

    folds = results["folds"]
    assert [(f["name"], f["pretrain_seed"]) for f in folds] == [("theo", 3), ("theo", 4)]
    assert results["encoder"] is None  # one encoder per pretraining seed
    files = [Path(f["encoder"]) for f in folds]
    assert [f"pretrain-seed{s}" in str(p) for s, p in zip((3, 4), files, strict=True)] == [True] * 2
    # each pretraining ran with all three of its run's seeds set: other weights
    for seed, file in zip((3, 4), files, strict=True):
        config = yaml.safe_load((file.parent / "config.yaml").read_text())
        assert (config["seed_everything"], config["model"]["seed"], config["data"]["seed"]) == (
            seed,
            seed,
            seed,
        )
    weights = [load_encoder_file(f).encoder.state_dict() for f in files]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])

    # pretrained rows once per pretraining, random init and fbank-stats once
    runs = results["runs"]
    count = {i: sum(r["init"] == i for r in runs) for i in ("pretrained", "random", "fbank-stats")}
    assert count == {"pretrained": 2 * 2 * 2, "random": 2 * 2, "fbank-stats": 2 * 2}
    assert {r["pretrain_seed"] for r in runs if r["init"] == "pretrained"} == {3, 4}
    assert {r["pretrain_seed"] for r in runs if r["init"] != "pretrained"} == {None}
    # the pretrained cell averages every (pretraining seed, probe seed) pair
    for row in results["summary"]:
        cell = [
            r["accuracy"]
            for r in runs
            if r["init"] == "pretrained" and r["labels_per_class"] == row["labels_per_class"]
        ]
        assert row["pretrained"]["n"] == 4
        assert row["pretrained"]["mean"] == pytest.approx(statistics.fmean(cell))
        assert row["random"]["n"] == 2
        # ... and each pretraining's own mean is given beside it (one fold: its runs' mean)
        each = row["pretrained"]["per_pretraining"]
        assert [e["pretrain_seed"] for e in each] == [3, 4]
        for e in each:
            own = [
                r["accuracy"]
                for r in runs
                if r["init"] == "pretrained"
                and r["labels_per_class"] == row["labels_per_class"]
                and r["pretrain_seed"] == e["pretrain_seed"]
            ]
            assert len(own) == 2 and e["mean"] == pytest.approx(statistics.fmean(own))
        assert "per_pretraining" not in row["random"]
    table = (out / "run-1" / "results.md").read_text()
    assert "pretraining seeds 3, 4" in table and "| pretrained, each pretraining |" in table
    last = results["summary"][-1]["pretrained"]["per_pretraining"]
    assert f"| {last[0]['mean'] * 100:.1f} / {last[1]['mean'] * 100:.1f} |" in table
