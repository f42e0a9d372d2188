"""`make demo`: its pieces quickly, and the whole pipeline in its --quick form (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _encoder_files import write_small_encoder

from ssamba import demo
from ssamba.models.checkpoints import load_encoder
from ssamba.tasks.classify import encoder_from_spec


def _runs(tmp_path: Path) -> list[demo.Run]:
    return [
        demo.Run(
            init, mode, split, 0.3 + 0.08 * i, 0.05 if split == "loso" else 0.0, 6, 1.0, tmp_path
        )
        for i, (split, init, mode) in enumerate(
            (s, i, m) for s in demo.SPLITS for i in demo.INITS for m in demo.MODES
        )
    ]


def test_random_init_rebuilds_exactly_the_pretrained_architecture(tmp_path: Path) -> None:
    encoder_file = write_small_encoder(tmp_path / "encoder.pt")
    init, encoder_arg = demo.init_args(encoder_file, "random")

    spec = json.loads(encoder_arg.removeprefix("--model.encoder="))

    assert init == "--model.init=random"
    assert encoder_from_spec(spec) == load_encoder(encoder_file).cfg


def test_fsdd_is_found_in_the_given_folder_without_cloning(
    fsdd_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SSAMBA_FSDD", raising=False)
    assert demo.locate_fsdd(fsdd_dir, tmp_path) == fsdd_dir.resolve()
    monkeypatch.setenv("SSAMBA_FSDD", str(fsdd_dir))
    assert demo.locate_fsdd(tmp_path / "missing", tmp_path) == fsdd_dir.resolve()
    assert not (tmp_path / "fsdd").exists()


def test_table_has_one_row_per_init_mode_split_and_the_plot_is_a_png(tmp_path: Path) -> None:
    runs = _runs(tmp_path)

    table = demo.format_table(runs, minutes=12.3, quick=False)
    plot = demo.plot_results(runs, tmp_path / "results.png")

    rows = [
        line
        for line in table.splitlines()
        if line.startswith("| pretrained") or line.startswith("| random")
    ]
    assert len(rows) == 8
    assert "| random | linear | loso | 86.0% ± 5.0 | 6 | 1.0 |" in table
    assert "12.3 minutes" in table
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reports_eight_accuracies(
    fsdd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = demo.main(["--fsdd", str(fsdd_dir), "--work", str(tmp_path), "--quick"])

    assert code == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["runs"]) == 8
    assert all(0.0 <= run["mean"] <= 1.0 for run in results["runs"])
    assert {run["folds"] for run in results["runs"] if run["split"] == "loso"} == {2}
    assert (tmp_path / "results.png").is_file()
    out = capsys.readouterr().out
    assert "tensorboard --logdir" in out and str(tmp_path / "results.png") in out
