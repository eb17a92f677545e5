"""Atomic file output: write to a temporary name in the same folder, fsync, rename.

Temporaries are named `.OUT.<pid>.<tag>.tmp` beside the output OUT, so that the next run writing
OUT can tell the leftovers of a killed writer (its pid is gone) from those of a running one and
remove them (`remove_stale_temporaries`).
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import shutil
from pathlib import Path

from .errors import UserInputError

logger = logging.getLogger(__name__)


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


_SERIAL = itertools.count()


def temporary_path(out: Path, tag: str = "") -> Path:
    """`.OUT.<pid>.<tag>.tmp` beside `out`; without `tag`, a serial number unique in this process."""
    tag = tag or f"t{next(_SERIAL)}"
    if not tag.isalnum():
        raise ValueError(f"temporary tag must be alphanumeric, found {tag!r}")
    out = Path(out)
    return out.with_name(f".{out.name}.{os.getpid()}.{tag}.tmp")


def pid_alive(pid: int) -> bool:
    """Whether process `pid` exists (this process counts as alive; so does one of another user)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Delete the temporaries (files or folders) of `out` whose writer process no longer exists."""
    out = Path(out)
    removed = []
    for path in out.parent.glob(f".{glob.escape(out.name)}.*.tmp"):
        parts = path.name[len(out.name) + 2:].split(".")
        if len(parts) != 3 or not parts[0].isdigit() or pid_alive(int(parts[0])):
            continue
        logger.info("removing %s, left by a killed run", path.name)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def create_temporary(out: Path) -> tuple[int, Path]:
    """Create and open a new temporary file for `out` (exclusive); returns (fd, path)."""
    while True:
        tmp = temporary_path(out)
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), tmp
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserInputError(f"cannot write in {tmp.parent}: {exc.strerror}") from None


def atomic_write_bytes(path: Path, data: bytes, force: bool = True) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    path = Path(path)
    check_output_file(path, force)
    remove_stale_temporaries(path)
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
