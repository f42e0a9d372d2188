"""The README's own-data path, run as written: list -> shards -> pretrain -> fine-tune ->
evaluate -> embed -> predict -> export -> label-efficiency, on a tiny CSV list of FSDD clips.

`COMMANDS` is the README's code block, character for character (the first test checks
that README.md holds it), so the README cannot drift from what runs. The slow test runs
each command in a fresh folder, with `recipes/` linked in, adding only options that
make it small (`SMALL`): a few pretraining steps, one fine-tuning epoch, a tiny encoder.
"""

from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssamba.cli import main as ssamba_main

REPO = Path(__file__).resolve().parents[1]

COMMANDS = """\
ssamba shard --corpus manifest --src my_data/clips.csv --out work/shards/mine
ssamba pretrain --config recipes/pretrain/fsdd_tiny_cpu.yaml \\
    --data.sources '[{shards: work/shards/mine, splits: [train]}]' \\
    --data.val '{shards: work/shards/mine, splits: [valid]}' \\
    --trainer.logger.init_args.name mine
ssamba finetune --config recipes/finetune/fsdd.yaml --task mine \\
    --data.shards work/shards/mine --data.val_filter '{split: valid}' --data.val_fraction 0 \\
    --model.init runs/pretrain/mine/version_0/encoder.pt \\
    --trainer.default_root_dir runs/finetune/mine --trainer.logger.init_args.name mine
ssamba evaluate --config recipes/finetune/fsdd.yaml --data.shards work/shards/mine \\
    --ckpt runs/finetune/mine/version_0/encoder.pt
ssamba embed my_data/audio --ckpt runs/finetune/mine/version_0/encoder.pt --out work/emb/mine
ssamba predict my_data/audio --ckpt runs/finetune/mine/version_0/encoder.pt --out work/preds.csv
ssamba export runs/finetune/mine/version_0/encoder.pt work/hf/mine --format hf
ssamba label-efficiency --shards work/shards/mine --out work/le/mine
"""

# What keeps each command small here (appended to the README's command line).
SMALL = {
    "shard": [],
    "pretrain": [
        "--trainer.max_steps=4",
        "--model.encoder.depth=2",
        "--model.encoder.embed_dim=32",
        "--data.batch_size=4",
        "--data.num_workers=0",
        "--trainer.enable_progress_bar=false",
    ],
    "finetune": [
        "--trainer.max_epochs=1",
        "--data.batch_size=4",
        "--trainer.enable_progress_bar=false",
    ],
    "evaluate": ["--data.batch_size=4", "--trainer.enable_progress_bar=false"],
    "embed": [],
    "predict": [],
    "export": [],
    "label-efficiency": [
        "--pretrain-args=--trainer.max_steps=4 --model.encoder.depth=2 "
        "--model.encoder.embed_dim=32 --data.batch_size=4 --data.num_workers=0 "
        "--trainer.enable_progress_bar=false",
        "--labels-per-class=1,all",
        "--finetune-labels-per-class=1",
        "--seeds=0",
        "--finetune-min-steps=2",
        "--finetune-epochs=1",
    ],
}
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
SPLIT_OF_TAKE = {0: "train", 1: "train", 2: "train", 3: "train", 4: "valid", 5: "test"}


def readme_commands(block: str) -> list[list[str]]:
    """The `ssamba ...` command lines of a shell block, continuations joined, split as
    the shell would."""
    joined = block.replace("\\\n", " ")
    return [shlex.split(line) for line in joined.splitlines() if line.startswith("ssamba ")]


def write_clip_list(fsdd_dir: Path, folder: Path) -> Path:
    """my_data/audio/*.wav (2 speakers x 10 digits x takes 0-5) and my_data/clips.csv."""
    audio = folder / "audio"
    audio.mkdir(parents=True)
    rows = ["path,label,split"]
    for speaker in ("jackson", "theo"):
        for digit in range(10):
            for take, split in SPLIT_OF_TAKE.items():
                name = f"{digit}_{speaker}_{take}.wav"
                shutil.copy(fsdd_dir / "recordings" / name, audio / name)
                rows.append(f"audio/{name},{DIGITS[digit]},{split}")
    listing = folder / "clips.csv"
    listing.write_text("\n".join(rows) + "\n")
    return listing


def test_the_readme_shows_these_commands() -> None:
    assert COMMANDS in (REPO / "README.md").read_text()
    assert [argv[1] for argv in readme_commands(COMMANDS)] == list(SMALL)


@pytest.mark.slow
def test_own_data_from_a_csv_list_to_embeddings(
    fsdd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_clip_list(fsdd_dir, tmp_path / "my_data")
    (tmp_path / "recipes").symlink_to(REPO / "recipes")
    monkeypatch.chdir(tmp_path)

    for argv in readme_commands(COMMANDS):
        assert ssamba_main([*argv[1:], *SMALL[argv[1]]]) == 0, " ".join(argv)

    stats = json.loads(Path("work/shards/mine/stats.json").read_text())
    assert stats["splits"] == {"train": 80, "valid": 20, "test": 20}
    run = Path("runs/finetune/mine")
    results = json.loads((run / "run-0" / "results.json").read_text())
    assert results["task"] == "mine" and results["clips"]["-"] == {
        "train": 80,
        "val": 20,
        "test": 20,
    }
    assert "best val/acc epoch" in results["selection"] and "valid" in results["selection"]
    evaluated = json.loads((run / "version_0" / "results.json").read_text())
    assert evaluated["value"] == pytest.approx(results["value"], abs=1e-6)
    embeddings = sorted(Path("work/emb/mine").glob("*.npy"))
    assert len(embeddings) == 120
    assert np.load(embeddings[0]).shape == (32,)
    predictions = Path("work/preds.csv").read_text().splitlines()
    assert predictions[0].startswith("file") and len(predictions) == 1 + 120
    assert {p.name for p in Path("work/hf/mine").iterdir()} >= {"config.json", "model.safetensors"}
    efficiency = json.loads(next(Path("work/le/mine").glob("run-*/results.json")).read_text())
    assert {r["init"] for r in efficiency["runs"]} == {"pretrained", "random", "fbank-stats"}
    for fold in efficiency["folds"]:
        assert fold["test_ids"] and not set(fold["test_ids"]) & set(fold["pretraining_ids"])
