"""`make demo`: its pieces quickly, and the whole pipeline in its --quick form (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssamba import demo, label_efficiency


def test_fsdd_is_found_in_the_given_folder_without_cloning(
    fsdd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSAMBA_FSDD", raising=False)
    assert demo.locate_fsdd(fsdd_dir, tmp_path) == fsdd_dir.resolve()
    monkeypatch.setenv("SSAMBA_FSDD", str(fsdd_dir))
    assert demo.locate_fsdd(tmp_path / "missing", tmp_path) == fsdd_dir.resolve()
    assert not (tmp_path / "fsdd").exists()


@pytest.mark.parametrize("budget", [demo.FULL, demo.QUICK], ids=["full", "quick"])
def test_every_option_is_one_label_efficiency_accepts(budget: tuple[str, ...]) -> None:
    args = label_efficiency.build_parser().parse_args(["--shards", "s", *demo.PROTOCOL, *budget])
    budgets = label_efficiency.parse_budgets(args.labels_per_class)
    tuned = label_efficiency.parse_budgets(args.finetune_labels_per_class or "all")
    assert budgets and set(tuned) <= set(budgets)
    assert args.loso == "speaker" and args.heldout == "theo,yweweler"
    assert args.encoder is None  # label-efficiency pretrains on the four other speakers


@pytest.mark.slow
def test_quick_demo_pretrains_without_the_held_out_speakers_and_reports_them(
    fsdd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--fsdd", str(fsdd_dir), "--work", str(tmp_path), "--quick"])

    assert code == 0
    out = tmp_path / "label-efficiency" / "run-1"
    results = json.loads((out / "results.json").read_text())
    assert [f["name"] for f in results["folds"]] == ["theo", "yweweler"]
    for fold in results["folds"]:
        heard = {i.split("_")[1] for i in fold["pretraining_ids"]}
        assert heard == {"george", "jackson", "lucas", "nicolas"}
        assert not set(fold["test_ids"]) & set(fold["pretraining_ids"])
    assert {r["init"] for r in results["runs"]} == {"pretrained", "random", "fbank-stats"}
    assert (out / "results.png").is_file()
    printed = capsys.readouterr().out
    assert "tensorboard --logdir" in printed and "pretrained - random" in printed
    assert "fbank-stats" in printed
