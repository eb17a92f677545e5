"""Atomic file output: write to a temporary name in the same folder, fsync, rename."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import UserInputError


def check_output_file(path: Path, force: bool) -> Path:
    """Fail before any work when output file `path` cannot be written; return its folder.

    Refused: an existing output without `force`, a directory in its place, a missing folder (or a
    file where the folder should be), a folder this process may not write to.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UserInputError(f"output {path} already exists; pass --force to replace it")
    if path.is_dir():
        raise UserInputError(f"output {path} is a directory; expected a file name")
    folder = path.absolute().parent
    if not folder.is_dir():
        what = "is not a folder" if folder.exists() else "does not exist"
        raise UserInputError(f"output folder {folder} {what}")
    if not os.access(folder, os.W_OK):
        raise UserInputError(f"output folder {folder} is not writable")
    return folder


def atomic_write_bytes(path: Path, data: bytes, force: bool = True) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    folder = check_output_file(path, force)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise UserInputError(f"cannot write in {folder}: {exc.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
