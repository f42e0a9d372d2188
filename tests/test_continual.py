"""`ssamba continual`: recipe checks, the forgetting / transfer arithmetic, and a small
run on real FSDD clips in which frozen-encoder adapters cannot forget."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import yaml

from data_prep.__main__ import main as data_prep_main
from ssamba.continual import ContinualError, main, read_recipe, summarise
from ssamba.features import FbankConfig
from ssamba.models.adapters import weights_sha256
from ssamba.models.encoder import AudioEncoder, EncoderConfig
from ssamba.models.encoder_file import EncoderFile, load_encoder_file


def write_recipe(folder: Path, tasks: list[dict], **extra) -> Path:
    (folder / "task.yaml").write_text("model: {}\n")
    tasks = [{**t, "recipe": str(folder / t["recipe"])} for t in tasks]
    recipe = {"init": str(folder / "base.pt"), "tasks": tasks, **extra}
    path = folder / "continual.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_tasks_sharing_a_name_are_refused_with_one_line(tmp_path, capsys):
    path = write_recipe(
        tmp_path,
        [{"name": "digit", "recipe": "task.yaml"}, {"name": "digit", "recipe": "task.yaml"}],
    )
    with pytest.raises(ContinualError, match="tasks 1 and 2 share the name 'digit'"):
        read_recipe(path)
    assert main(["--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssamba continual: error:") and "share the name" in err
    assert "\n" not in err
    assert not (tmp_path / "out").exists()


def test_unknown_method_and_missing_task_recipe_are_named(tmp_path):
    path = write_recipe(tmp_path, [{"name": "a", "recipe": "task.yaml"}], methods=["replay"])
    with pytest.raises(ContinualError, match=r"methods \['replay'\]"):
        read_recipe(path)
    path = write_recipe(tmp_path, [{"name": "a", "recipe": "missing.yaml"}])
    with pytest.raises(ContinualError, match=r"task 'a': recipe .*missing\.yaml not found"):
        read_recipe(path)


def test_task_recipes_are_found_from_the_current_directory(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "task.yaml").write_text("model: {}\n")
    (tmp_path / "lists").mkdir()
    path = tmp_path / "lists" / "continual.yaml"  # elsewhere than the task recipe
    tasks = [{"name": "a", "recipe": "recipes/task.yaml"}]
    path.write_text(yaml.safe_dump({"init": "base.pt", "tasks": tasks}))
    monkeypatch.chdir(tmp_path)

    assert read_recipe(path)["tasks"][0]["recipe"] == str(tmp_path / "recipes" / "task.yaml")


def test_derive_fsdd_without_a_manifest_names_the_option(tmp_path, capsys):
    code = main(
        ["--derive-fsdd", str(tmp_path / "lists"), "--manifest", str(tmp_path / "no.jsonl")]
    )

    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "--manifest" in err and "no.jsonl" in err and "\n" not in err


def test_forgetting_and_backward_transfer_of_an_accuracy_matrix():
    matrix = [[0.9], [0.7, 0.8], [0.6, 0.85, 0.5]]
    summary = summarise(matrix, [10, 10, 10], 0.05, 1.0)
    assert summary["final"] == [0.6, 0.85, 0.5]
    assert summary["average_accuracy"] == pytest.approx((0.6 + 0.85 + 0.5) / 3)
    # best earlier minus final: task 0: 0.9 - 0.6, task 1: 0.8 - 0.85 (it improved)
    assert summary["forgetting"] == pytest.approx((0.3 - 0.05) / 2)
    assert summary["backward_transfer"] == pytest.approx(((0.6 - 0.9) + (0.85 - 0.8)) / 2)


@pytest.fixture(scope="module")
def two_task_setup(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Digits 0-3 of two speakers as two label sets (digit, speaker), a tiny base encoder."""
    root = tmp_path_factory.mktemp("continual")
    for task, label in (("digit", lambda d, s: d), ("speaker", lambda d, s: s)):
        listing = root / f"{task}.csv"
        with listing.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["path", "label", "split", "speaker"])
            for digit in range(4):
                for speaker in ("jackson", "theo"):
                    for index in range(12):
                        split = "test" if index < 3 else "train"
                        wav = fsdd_dir / "recordings" / f"{digit}_{speaker}_{index}.wav"
                        writer.writerow([wav, label(digit, speaker), split, speaker])
        args = ["shard", "--corpus", "manifest", "--src", str(listing)]
        assert data_prep_main([*args, "--out", str(root / task)]) == 0
    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig(family="ssamba", embed_dim=32, depth=2, input_frames=64))
    features = FbankConfig(target_length=64, mean=-8.8, std=4.6)
    EncoderFile(encoder, features).save(root / "base.pt")
    (root / "task.yaml").write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "model": {"pooling": "mean", "lr": 3.0e-3, "schedule": "constant"},
                "data": {
                    "batch_size": 8,
                    "num_workers": 0,
                    "val_fraction": 0.2,
                    "features": {"target_length": 64, "stats": [-8.8, 4.6]},
                },
                "trainer": {"accelerator": "cpu", "max_epochs": 2, "enable_model_summary": False},
            }
        )
    )
    return root


@pytest.mark.slow
def test_adapters_forget_nothing_while_sequential_finetuning_moves_the_encoder(two_task_setup):
    root = two_task_setup
    tasks = [
        {
            "name": "digit",
            "recipe": str(root / "task.yaml"),
            "overrides": {"data.shards": str(root / "digit")},
        },
        {
            "name": "speaker",
            "recipe": str(root / "task.yaml"),
            "overrides": {"data.shards": str(root / "speaker")},
        },
    ]
    recipe = root / "continual.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "init": str(root / "base.pt"),
                "methods": ["adapter", "finetune"],
                "adapter": {"kind": "bottleneck", "size": 8},
                "tasks": tasks,
            }
        )
    )
    out = root / "out"
    base_before = weights_sha256(load_encoder_file(root / "base.pt").encoder)
    assert main(["--config", str(recipe), "--out", str(out), "--max-epochs", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["tasks"] == ["digit", "speaker"]
    # --max-epochs 1 overrode the recipe's 2: every training's last checkpoint is epoch 0
    lasts = list(out.rglob("last.ckpt"))
    assert len(lasts) == 4  # 2 methods x 2 tasks
    assert {torch.load(p, weights_only=True)["epoch"] for p in lasts} == {0}
    adapter, finetune = results["methods"]["adapter"], results["methods"]["finetune"]
    for method in (adapter, finetune):
        assert [len(row) for row in method["accuracy"]] == [1, 2]
        assert all(0.0 <= a <= 1.0 for row in method["accuracy"] for a in row)
    # The shared encoder is frozen: task 1 scores exactly the same after task 2.
    assert adapter["accuracy"][1][0] == adapter["accuracy"][0][0]
    assert adapter["forgetting"] == 0.0
    assert 0 < adapter["trainable_fraction"] < 0.1
    assert finetune["trainable_fraction"] > 0.99  # all but the pretraining-only mask token
    # Sequential fine-tuning changed the carried encoder; the base file did not change.
    carried = load_encoder_file(out / "finetune" / "after-speaker.pt").encoder
    assert weights_sha256(carried) != base_before
    assert weights_sha256(load_encoder_file(root / "base.pt").encoder) == base_before
    assert (out / "adapter" / "digit.pt").is_file() and (out / "results.png").is_file()
    assert "| adapter |" in (out / "results.md").read_text()


def test_earlier_tasks_are_scored_with_their_own_head_even_aums_bare_linear_one(
    two_task_setup, tmp_path
):
    # An AuM classifier file: its head is a bare Linear (no LayerNorm) for the 4 digits, so
    # the digit task keeps it; rebuilding a LayerNorm + Linear head to score it would fail.
    root = two_task_setup
    torch.manual_seed(0)
    encoder = AudioEncoder(EncoderConfig(family="aum", embed_dim=32, depth=2, input_frames=64))
    head = {"1.weight": torch.randn(4, 32), "1.bias": torch.zeros(4)}
    features = FbankConfig(target_length=64, mean=-8.8, std=4.6)
    base = EncoderFile(encoder, features, labels=list("0123"), head=head).save(tmp_path / "aum.pt")
    tasks = [
        {
            "name": name,
            "recipe": str(root / "task.yaml"),
            "overrides": {"data.shards": str(root / name)},
        }
        for name in ("digit", "speaker")
    ]
    recipe = tmp_path / "continual.yaml"
    recipe.write_text(yaml.safe_dump({"init": str(base), "methods": ["finetune"], "tasks": tasks}))

    assert main(["--config", str(recipe), "--out", str(tmp_path / "out"), "--max-epochs", "1"]) == 0

    accuracy = json.loads((tmp_path / "out" / "results.json").read_text())["methods"]["finetune"]
    assert [len(row) for row in accuracy["accuracy"]] == [1, 2]
