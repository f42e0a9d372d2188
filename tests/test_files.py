"""Atomic writes and writable-folder checks (ssamba.files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ssamba.files import (
    UnwritableError,
    atomic_path,
    atomic_write_text,
    writable_folder,
)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(OSError, match="No space left"), atomic_path(target) as staged:
        staged.write_text("half of the new")
        raise OSError(28, "No space left on device")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_a_finished_write_replaces_the_file_in_its_own_folder(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "results.json"
    with atomic_path(target) as staged:
        assert staged.parent == target.parent  # a rename, never a copy across file systems
        staged.write_text("new")
    assert target.read_text() == "new"
    assert atomic_write_text(target, "newer").read_text() == "newer"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_a_file_in_the_way_of_a_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file, not a folder")
    with pytest.raises(UnwritableError, match=r"^--out .*out/run: cannot write there"):
        writable_folder(blocker / "run", "--out")
    assert writable_folder(tmp_path / "fine", "--out").is_dir()


def test_a_plot_that_fails_half_written_leaves_the_old_plot(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from matplotlib.figure import Figure

    from ssamba.continual import write_report

    def disk_full(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"\x89PNG half")
        raise OSError(28, "No space left on device")

    plot = tmp_path / "results.png"
    plot.write_bytes(b"the earlier plot")
    monkeypatch.setattr(Figure, "savefig", disk_full)
    results = {
        "tasks": ["digit"],
        "methods": {
            "linear": {
                "final": [0.5], "accuracy": [[0.5]], "average_accuracy": 0.5,
                "forgetting": 0.0, "backward_transfer": 0.0, "trainable_params": [10],
                "trainable_fraction": 0.01, "minutes": 1.0,
            }
        },
    }  # fmt: skip

    with pytest.raises(OSError, match="No space left"):
        write_report(results, tmp_path)

    assert plot.read_bytes() == b"the earlier plot"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "results.json",
        "results.md",
        "results.png",
    ]
