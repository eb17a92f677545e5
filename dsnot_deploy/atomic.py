"""Atomic output, the one writer of every file and folder this project produces: write to a
temporary name in the same folder, fsync, rename, fsync the folder.

Temporaries are named `.OUT.<pid>.<tag>.tmp` beside the output OUT, so that the next run writing
OUT can tell the leftovers of a killed writer (its pid is gone) from those of a running one and
remove them (`remove_stale_temporaries`). Files get the mode of an ordinary new file (0666 minus
the umask), like the GGUF that llama.cpp's quantizer writes.
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dsnot_deploy.errors import UserInputError

logger = logging.getLogger(__name__)


def check_output_file(path: Path, force: bool) -> Path:
    """Fail before any work when output file `path` cannot be written; return its folder.

    Refused: an existing output without `force`, a directory in its place, a missing folder (or a
    file where the folder should be), a folder this process may not write to.
    """
    path = Path(path)
    if path.exists() and not force:
        raise UserInputError(exists_message(path))
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


def remove_tree(path: Path) -> None:
    """Remove a file, a link or a folder tree if it exists."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            logger.warning("could not remove %s", path)


def remove_stale_temporaries(out: Path) -> list[Path]:
    """Clean up after writers of `out` that were killed (their pid is gone); return what was removed.

    An unfinished temporary is deleted. A displaced previous output (`.OUT.<pid>.old.tmp`, left when
    the kill fell between the two renames of `replace_into_place`) is renamed back to `out` when
    `out` is missing, else deleted. Entries of live processes are left alone.
    """
    out = Path(out).absolute()
    if not out.parent.is_dir():
        return []
    removed = []
    for path in sorted(out.parent.glob(f".{glob.escape(out.name)}.*.tmp")):
        parts = path.name[len(out.name) + 2:].split(".")
        if len(parts) != 3 or not parts[0].isdigit() or pid_alive(int(parts[0])):
            continue
        if parts[1] == "old" and not (out.exists() or out.is_symlink()):
            logger.warning("restoring %s from %s (left by a killed run between its two renames)", out, path.name)
            os.rename(path, out)
            fsync_folder(out.parent)
            continue
        logger.info("removing %s, left by a killed run", path.name)
        remove_tree(path)
        removed.append(path)
    return removed


def create_temporary(out: Path) -> tuple[int, Path]:
    """Create and open a new temporary file for `out` (exclusive); returns (fd, path)."""
    while True:
        tmp = temporary_path(out)
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666), tmp  # the umask applies
        except FileExistsError:
            continue
        except OSError as exc:
            raise UserInputError(f"cannot write in {tmp.parent}: {exc.strerror}") from None


def fsync_folder(path: Path) -> None:
    """fsync a folder so that a rename inside it survives a crash (a no-op where refused)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Yield a temporary file in `path`'s folder; on success fsync it, rename it to `path` and fsync
    the folder. On any exception the temporary is removed and `path` is left as it was."""
    path = Path(path)
    check_output_file(path, force)
    remove_stale_temporaries(path)  # a killed earlier writer's
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if path.is_dir():
            raise UserInputError(f"output {path} is a directory, expected a file path")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.absolute().parent)


def atomic_write_bytes(path: Path, data: bytes, force: bool = True) -> None:
    """Write `data` to `path` so that readers see either the old file or the complete new one."""
    with atomic_file(path, force) as fh:
        fh.write(data)


def exists_message(out: Path) -> str:
    return f"output {out} already exists; pass --force to replace it"


def replace_into_place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished temporary `tmp` (file or folder) to `out`, then fsync the folder.

    An existing `out` (only with `force`) is first renamed aside to `.OUT.<pid>.old.tmp`, put back if
    the second rename fails, and deleted after it succeeded; a kill between the two renames is
    repaired by the next writer's `remove_stale_temporaries`.
    """
    out = Path(out)
    parent = out.absolute().parent
    if not (out.exists() or out.is_symlink()):
        os.rename(tmp, out)
        fsync_folder(parent)
        return
    if not force:
        raise UserInputError(exists_message(out))
    old = temporary_path(out, "old")
    remove_tree(old)
    os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old, out)  # put the previous output back
        raise
    fsync_folder(parent)
    remove_tree(old)


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success fsync its files and move it to `path`
    (replacing it), then fsync the parent folder."""
    path = Path(path)
    check_output_file(path, force)
    remove_stale_temporaries(path)  # a killed earlier writer's
    tmp = temporary_path(path, "d")
    try:
        tmp.mkdir()
    except OSError as exc:
        raise UserInputError(f"cannot write in {tmp.parent}: {exc.strerror}") from None
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        replace_into_place(tmp, path, force)
    except BaseException:
        remove_tree(tmp)
        raise
