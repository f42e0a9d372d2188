"""Shared fixtures: where the real audio lives, small synthetic signals.

Real audio is required, not optional: a missing folder fails the tests with a
message saying how to provide it, rather than skipping them into a green run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def fsdd_dir() -> Path:
    """The Free Spoken Digit Dataset: `$SSAMBA_FSDD` or `../shared/data/fsdd`."""
    path = Path(os.environ.get("SSAMBA_FSDD", REPO_ROOT.parent / "shared" / "data" / "fsdd"))
    if not (path / "recordings").is_dir():
        pytest.fail(f"FSDD not found at {path}: set SSAMBA_FSDD to a folder with recordings/")
    return path


@pytest.fixture(scope="session")
def sample_wav() -> Path:
    """A real 30 s, 16 kHz two-speaker recording (`make assets` fetches it)."""
    path = Path(os.environ.get("SSAMBA_SAMPLE_WAV", REPO_ROOT / "work" / "assets" / "sample.wav"))
    if not path.is_file():
        pytest.fail(f"{path} missing: run `make assets` (or `make test`, which does)")
    return path


@pytest.fixture(scope="session")
def fsdd_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """All of FSDD (3,000 clips: train 2,700, test 300, 6 speakers) sharded by the real
    `ssamba shard` pipeline once per session, for the end-to-end fine-tuning and
    pretraining tests."""
    from data_prep.__main__ import main as data_prep_main

    out = tmp_path_factory.mktemp("fsdd_all_shards")
    code = data_prep_main(
        ["shard", "--corpus", "fsdd", "--src", str(fsdd_dir), "--out", str(out), "--workers", "2"]
    )
    assert code == 0, "sharding FSDD failed"
    return out


@pytest.fixture(scope="session")
def subset_shards(fsdd_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of 3 FSDD speakers x 10 digits x takes 0-5 (150 official-test clips, 30
    training clips), written once per session for the quick fine-tuning tests, which only
    read them."""
    from test_finetune import fsdd_subset

    return fsdd_subset(fsdd_dir, tmp_path_factory.mktemp("fsdd_subset"))
