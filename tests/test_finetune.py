"""`ssamba finetune` and `ssamba evaluate`: the recipes, fold runs, results files, the
errors a user can act on, and FSDD end to end (slow).

Fast tests train a 2-layer, 32-wide encoder for one short epoch on FSDD shards written by
data_prep's own shard writer from a 3-speaker subset; the slow test pretrains a small
encoder with `ssamba pretrain` and fine-tunes it with the unmodified FSDD recipes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from data_prep import CORPORA, prepare
from data_prep.shard import write_shards
from ssamba.data import LabelledDataModule
from ssamba.features import FeatureConfig
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file
from ssamba.tasks.classify import ClassifyTask
from ssamba.tasks.evaluate_cli import evaluate
from ssamba.tasks.evaluate_cli import main as evaluate_main
from ssamba.tasks.finetune_cli import finetune, latest_results
from ssamba.tasks.finetune_cli import main as finetune_main
from ssamba.tasks.pretrain_cli import pretrain

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "recipes" / "finetune"
RECIPES = sorted(FINETUNE.glob("*.yaml"))
FSDD = FINETUNE / "fsdd.yaml"
FSDD_LOSO = FINETUNE / "fsdd_loso.yaml"
SPEAKERS = ["george", "jackson", "theo"]
SMALL = {"family": "ssamba", "depth": 2, "embed_dim": 32}
# The end-to-end test's "small but real" encoder: 4 layers (2 bidirectional pairs), 64
# wide, pretrained for 150 steps by the CPU recipe; the fine-tuning recipe runs unchanged.
E2E_PRETRAIN = ["--trainer.max_steps=150"]
# LOSO only has to show the fold machinery on the real recipe: one short epoch per fold.
E2E_LOSO = ["--trainer.max_epochs=1", "--trainer.limit_train_batches=10"]


def save_encoder(encoder: AudioEncoder, path: Path) -> Path:
    return EncoderFile(encoder, None).save(path)


def results_of(out: Path) -> dict:
    """results.json of the newest run under a task folder."""
    return json.loads(latest_results(out).read_text())


def run_options(shards: Path, out: Path) -> list[str]:
    """Point a FSDD recipe at test shards and a test folder, as `make demo` does."""
    return [
        f"--data.shards={shards}",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]


def quick(shards: Path, out: Path) -> list[str]:
    """A random 2-layer encoder, one epoch of 4 batches: the pipeline, not a result."""
    return [
        *run_options(shards, out),
        "--model.init=random",
        f"--model.encoder={json.dumps(SMALL)}",
        "--data.batch_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=4",
    ]


def fsdd_subset(fsdd_dir: Path, root: Path, takes: int = 6) -> Path:
    """Shards of `SPEAKERS` x 10 digits x takes 0..takes-1 (0-4 are the official test
    split), written by data_prep's own shard writer; returns the shard folder."""
    recordings = root / "src" / "recordings"
    recordings.mkdir(parents=True)
    for speaker in SPEAKERS:
        for digit in range(10):
            for take in range(takes):
                name = f"{digit}_{speaker}_{take}.wav"
                shutil.copy(fsdd_dir / "recordings" / name, recordings / name)
    out = root / "shards"
    write_shards(prepare("fsdd", root / "src", out), out, stats_clips=60)
    return out


@pytest.fixture(scope="module")
def finetuned(subset_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One quick official-split fine-tuning run; returns its folder (with results.json)."""
    out = tmp_path_factory.mktemp("finetuned")
    assert finetune_main(["--config", str(FSDD), *quick(subset_shards, out)]) == 0
    return out


# ------------------------------------------------------------------ recipes


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_prints_its_config_and_shards_the_corpus_its_header_names(
    recipe: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert finetune_main(["--config", str(recipe), "--print_config"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)

    header = recipe.read_text()
    corpus = re.search(r"make shards CORPUS=(\w+)", header).group(1)
    assert corpus in CORPORA
    assert config["data"]["shards"] == f"work/shards/{corpus}"
    assert f"ssamba finetune --config recipes/finetune/{recipe.name}" in header
    assert config["trainer"]["logger"]["init_args"]["save_dir"] == "runs/finetune"
    assert config["trainer"]["default_root_dir"] == f"runs/finetune/{recipe.stem}"
    cross_validation = config["cross_validation"]
    if cross_validation:  # the recipe's own fold is one of the folds `--folds all` runs
        section, key = cross_validation["key"].split(".")
        folds = cross_validation["folds"]
        assert config[section][key] in (folds if isinstance(folds, list) else folds.values())
        assert "--folds all" in header


def test_a_misspelled_recipe_key_fails_naming_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    recipe = tmp_path / "typo.yaml"
    recipe.write_text(FSDD.read_text().replace("  batch_size:", "  batchsize:"))

    assert finetune_main(["--config", str(recipe), "--print_config"]) == 2
    assert "batchsize" in capsys.readouterr().err


# ------------------------------------------------------------------ data splits


def split_ids(dm: LabelledDataModule) -> dict[str, set[str]]:
    dm.split_clips()
    return {name: {c.meta["id"] for c in clips} for name, clips in dm.subsets.items()}


def test_val_fraction_holds_out_the_same_training_clips_every_time(subset_shards: Path) -> None:
    options = {"features": FeatureConfig(target_length=64), "num_workers": 0, "val_fraction": 0.3}
    loso = split_ids(
        LabelledDataModule(str(subset_shards), test_filter={"speaker": "theo"}, **options)
    )
    again = split_ids(
        LabelledDataModule(str(subset_shards), test_filter={"speaker": "theo"}, **options)
    )

    assert loso == again
    assert {i.split("_")[1] for i in loso["test"]} == {"theo"}
    assert not loso["val"] & loso["test"] and not loso["val"] & loso["train"]
    non_test = len(loso["val"]) + len(loso["train"])
    assert non_test == 2 * 60 and 0.2 < len(loso["val"]) / non_test < 0.4
    official = split_ids(LabelledDataModule(str(subset_shards), **options))
    assert all(i.endswith("_5") for i in official["val"] | official["train"])  # take 5 only


def test_validation_that_overlaps_the_test_set_is_refused(subset_shards: Path) -> None:
    # every take-0..4 clip of theo is test; validating on the official test split shares them
    dm = LabelledDataModule(
        str(subset_shards), test_filter={"speaker": "theo"}, val_filter={"split": "test"}
    )
    with pytest.raises(ValueError, match=r"val set .* and the test set .* share 50 clips"):
        dm.split_clips()
    with pytest.raises(ValueError, match=r"val_fraction: give one validation set"):
        LabelledDataModule(str(subset_shards), val_filter={"split": "test"}, val_fraction=0.1)


# ------------------------------------------------------------------ errors before training


def test_unknown_fold_and_folds_without_cross_validation_name_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert (
        finetune_main(
            ["--config", str(FSDD_LOSO), "--folds", "theo,bob", f"--trainer.default_root_dir={out}"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "'bob'" in err and "george" in err and "yweweler" in err
    assert finetune_main(["--config", str(FSDD), "--folds", "all"]) == 2
    assert "no cross_validation section" in capsys.readouterr().err
    assert not out.exists()


def test_label_outside_the_label_map_stops_the_run_before_training(
    subset_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = tmp_path / "shards"
    shutil.copytree(subset_shards, shards)
    labels = (shards / "labels.csv").read_text().splitlines()
    (shards / "labels.csv").write_text("\n".join(labels[:-1]) + "\n")  # digit 9 left out

    code = finetune_main(["--config", str(FSDD), *quick(shards, tmp_path / "run")])

    assert code == 2
    assert re.search(
        r"clip '9_\w+_\d' has label '9', which is not in .*labels\.csv", capsys.readouterr().err
    )
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize(
    ("stored", "asked", "message"),
    [
        (SMALL, {**SMALL, "embed_dim": 64}, r"embed_dim 32, depth 2\) but .* \(embed_dim 64"),
        (SMALL, {**SMALL, "family": "ssast", "num_heads": 2}, r"holds a ssamba .* asks for ssast"),
    ],
    ids=["size", "family"],
)
def test_checkpoint_of_another_size_or_family_stops_the_run_naming_both(
    subset_shards: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    stored: dict,
    asked: dict,
    message: str,
) -> None:
    encoder = save_encoder(
        AudioEncoder(EncoderConfig(**stored, input_frames=64)), tmp_path / "encoder.pt"
    )
    options = [*run_options(subset_shards, tmp_path / "run"), f"--model.init={encoder}"]

    code = finetune_main(["--config", str(FSDD), *options, f"--model.encoder={json.dumps(asked)}"])

    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not list(tmp_path.rglob("*.ckpt"))


# ------------------------------------------------------------------ results


def test_official_split_run_tests_the_epoch_chosen_on_held_out_training_clips(
    finetuned: Path,
) -> None:
    results = results_of(finetuned)

    assert results["task"] == "fsdd" and results["metric"] == "acc"
    assert results["folds"] is None and results["std"] == 0.0
    assert 0.0 <= results["value"] <= 1.0 and results["mean"] == results["value"]
    clips = results["clips"]["-"]
    assert clips["test"] == len(SPEAKERS) * 10 * 5  # takes 0-4 of every digit and speaker
    assert clips["train"] + clips["val"] == len(SPEAKERS) * 10  # take 5
    assert clips["val"] > 0
    assert "val = 10% of the training clips, held out" in results["selection"]
    assert Path(results["checkpoint"]["-"]).is_file()
    assert re.fullmatch(r"[0-9a-f]{12}", results["config_hash"])


def test_finetune_and_evaluate_return_the_model_metrics_and_files_they_wrote(
    subset_shards: Path, tmp_path: Path
) -> None:
    trained = finetune(["--config", str(FSDD), *quick(subset_shards, tmp_path / "ft")])

    assert isinstance(trained.model, ClassifyTask)
    assert Path(trained.files["results"]) == latest_results(tmp_path / "ft").resolve()
    record = json.loads(Path(trained.files["results"]).read_text())
    assert trained.record == record
    assert trained.metrics["test/acc"] == pytest.approx(record["value"])
    assert trained.files["encoder"] == record["encoder_file"]["-"]
    assert load_encoder_file(trained.files["encoder"]).head  # the tested classifier

    scored = evaluate(
        ["--ckpt", trained.files["encoder"], "--config", str(FSDD),
         f"--data.shards={subset_shards}", "--trainer.enable_progress_bar=false",
         "--out", str(tmp_path / "eval")]
    )  # fmt: skip

    assert scored.metrics["test/acc"] == pytest.approx(record["value"], abs=1e-6)
    assert Path(scored.files["results"]) == (tmp_path / "eval" / "results.json").resolve()


def test_loso_folds_test_each_speaker_and_report_mean_and_std(
    subset_shards: Path, tmp_path: Path
) -> None:
    out = tmp_path / "loso"
    options = [*quick(subset_shards, out), "--folds", "george,theo"]

    assert finetune_main(["--config", str(FSDD_LOSO), *options]) == 0

    results = results_of(out)
    folds = results["folds"]
    assert list(folds) == ["george", "theo"]
    assert results["mean"] == pytest.approx(statistics.fmean(folds.values()))
    assert results["std"] == pytest.approx(statistics.stdev(folds.values()))
    for speaker in folds:
        assert results["clips"][speaker]["test"] == 10 * 6  # every clip of that speaker
        assert f"fold-{speaker}" in results["checkpoint"][speaker]


def test_evaluate_prints_a_table_and_rescores_the_finetuned_checkpoint(
    finetuned: Path, subset_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trained = results_of(finetuned)
    ckpt = trained["checkpoint"]["-"]
    options = [f"--data.shards={subset_shards}", "--trainer.enable_progress_bar=false"]

    code = evaluate_main(["--ckpt", ckpt, "--config", str(FSDD), *options, "--out", str(tmp_path)])

    assert code == 0
    table = capsys.readouterr().out
    assert re.search(r"task\s+split\s+metric\s+value", table)
    assert re.search(r"fsdd\s+test\s+acc\s+\d\.\d{4}", table)
    results = json.loads((tmp_path / "results.json").read_text())
    assert {"task", "metric", "value", "checkpoint", "config_hash"} <= set(results)
    assert results["checkpoint"] == ckpt and results["metric"] == "acc"
    assert results["value"] == pytest.approx(trained["value"], abs=1e-6)


def test_evaluate_refuses_an_encoder_without_a_classification_head(
    subset_shards: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    encoder = save_encoder(
        AudioEncoder(EncoderConfig(**SMALL, input_frames=64)), tmp_path / "encoder.pt"
    )

    code = evaluate_main(
        ["--ckpt", str(encoder), "--config", str(FSDD), f"--data.shards={subset_shards}"]
    )

    assert code == 2
    assert "has no classification head" in capsys.readouterr().err


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_fsdd_pretrain_then_finetune_reaches_90_percent_and_loso_reports_folds(
    fsdd_shards: Path, tmp_path: Path
) -> None:
    pretrain_out = tmp_path / "pretrain"
    pretrained = pretrain(
        [
            "--config",
            str(REPO / "recipes" / "pretrain" / "fsdd_tiny_cpu.yaml"),
            f"--data.sources=[{{shards: {fsdd_shards}, splits: [train]}}]",
            f"--data.val={{shards: {fsdd_shards}, splits: [test]}}",
            f"--trainer.default_root_dir={pretrain_out}",
            f"--trainer.logger.init_args.save_dir={pretrain_out}",
            "--trainer.enable_progress_bar=false",
            *E2E_PRETRAIN,
        ]
    )
    encoder = pretrained.files["encoder"]  # the file this run exported, not a glob
    assert Path(encoder).parent.parent.parent == pretrain_out.resolve()
    assert math.isfinite(pretrained.metrics["val/mse"])

    official = tmp_path / "official"
    options = [*run_options(fsdd_shards, official), f"--model.init={encoder}"]
    assert finetune_main(["--config", str(FSDD), *options]) == 0
    results = results_of(official)
    assert results["value"] >= 0.90, results

    loso = tmp_path / "loso"
    options = [*run_options(fsdd_shards, loso), f"--model.init={encoder}", *E2E_LOSO]
    assert finetune_main(["--config", str(FSDD_LOSO), *options, "--folds", "george,theo"]) == 0
    results = results_of(loso)
    assert list(results["folds"]) == ["george", "theo"]
    assert results["std"] == pytest.approx(statistics.stdev(results["folds"].values()))
