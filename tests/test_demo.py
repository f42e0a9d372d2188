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
def test_every_split_option_is_one_label_efficiency_accepts(budget: demo.Budget) -> None:
    parser = label_efficiency.build_parser()
    for split, extra in demo.SPLITS.items():
        options = budget.official if split == "official" else budget.loso
        args = parser.parse_args(["--shards", "s", *extra, *options])
        budgets = label_efficiency.parse_budgets(args.labels_per_class)
        tuned = label_efficiency.parse_budgets(args.finetune_labels_per_class or "all")
        assert budgets and (not args.finetune_labels_per_class or set(tuned) <= set(budgets))
        assert (args.loso == "speaker") == (split == "loso")


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_both_splits(
    fsdd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--fsdd", str(fsdd_dir), "--work", str(tmp_path), "--quick"])

    assert code == 0
    for split, folds in (("official", {"official"}), ("loso", {"george", "theo"})):
        out = tmp_path / "label-efficiency" / split
        results = json.loads((out / "results.json").read_text())
        assert {r["fold"] for r in results["runs"]} == folds
        assert {r["init"] for r in results["runs"]} == {"pretrained", "random"}
        assert all(0.0 <= r["accuracy"] <= 1.0 for r in results["runs"])
        assert (out / "results.png").is_file()
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and "pretrained - random" in out
