"""Writing files so that a crash, a kill or a full disk never leaves a broken one behind.

Every file a later command reads (checkpoints, encoder files, results) is written next to
its target under a temporary name, flushed to disk (`fsync`) and renamed over the target.
A rename within one folder is atomic on POSIX file systems, so readers see the old file or
the new one, never half of one; staging in the system temp folder and copying would not be
(the copy can stop half way when the run folder is on another file system).

    with atomic_path(out / "encoder.pt") as staged:   # write anything to `staged`
        torch.save(payload, staged)
    atomic_write_text(out / "results.json", text)
    folder = writable_folder(out, "--out")            # or one line naming the option
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


class UnwritableError(OSError):
    """A folder that cannot be created or written; the message is one line for the user."""


def writable_folder(folder: str | Path, what: str) -> Path:
    """Create `folder` if needed and check that files can be made in it.

    what: how the user named it (an option such as "--out"), for the one-line error.
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-check-"):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise UnwritableError(f"{what} {path}: cannot write there ({reason})") from None
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (the folder's entry), where the OS allows it."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success it is fsynced and renamed over it.

    On any error (a full disk included) the temporary file is removed and `target` is left
    as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    staged = Path(name)
    try:
        yield staged
        replace_durably(staged, target)
    except BaseException:
        staged.unlink(missing_ok=True)
        raise


def replace_durably(staged: str | Path, target: str | Path) -> None:
    """fsync the written file `staged`, rename it over `target` (same file system), and
    make the rename durable: a crash or full disk leaves the old `target` or the new one."""
    with open(staged, "rb+") as handle:
        os.fsync(handle.fileno())
    os.replace(staged, target)
    _fsync_folder(Path(target).parent)


def atomic_write_text(target: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `target` atomically; returns `target`."""
    with atomic_path(target) as staged:
        staged.write_text(text, encoding="utf-8")
    return Path(target)
