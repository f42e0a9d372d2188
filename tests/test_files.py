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
