"""Lightning checkpoints written so that a full disk or a kill never leaves a broken one,
and a broken one found at resume time is named instead of crashing the run.

Lightning's `TorchCheckpointIO` stages a checkpoint through fsspec's temporary file in the
system temp folder and copies it over the target; when the run folder is on another file
system the copy is not atomic and a full disk leaves a truncated `last.ckpt` that every
later `--ckpt_path last` trips over. `AtomicCheckpointIO` writes local checkpoints with
`ssamba.files.atomic_path` instead (beside the target, fsync, rename); remote URLs keep
Lightning's own path. Every `ssamba` training CLI installs it (`SsambaCLI`), and every
checkpoint a run writes (periodic, best, last, the averaged weights, `end.ckpt`) goes
through it, because `Trainer.save_checkpoint` does.

    damage = checkpoint_damage(path)   # None for an intact checkpoint, else why not
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import torch
from fsspec.implementations.local import LocalFileSystem
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.fabric.utilities.types import _PATH
from typing_extensions import override

from ssamba.files import atomic_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` whose local saves are atomic (see the module docstring)."""

    @override
    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        remote = not isinstance(get_filesystem(path), LocalFileSystem)  # s3://, gs://, ...
        if remote or storage_options is not None:  # Lightning's own way (or its TypeError)
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        with atomic_path(path) as staged:
            torch.save(checkpoint, staged)


def checkpoint_damage(path: str | Path) -> str | None:
    """Why the checkpoint at `path` cannot be read whole (truncated, a bad CRC, not a
    checkpoint at all), or None when it is intact. Reads the whole file once: torch
    checkpoints are zip archives, and `testzip` checks every member's CRC."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as error:
        return f"truncated or not a checkpoint ({error})"
    return None if bad is None else f"member {bad} is corrupt (CRC mismatch)"
