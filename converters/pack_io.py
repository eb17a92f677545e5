"""Atomic outputs for the pack converters: a file or a directory appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from dsnot_deploy.atomic import (
    check_output_file,
    create_temporary,
    remove_stale_temporaries,
    temporary_path,
)
from dsnot_deploy.errors import UserInputError


@contextlib.contextmanager
def atomic_file(path: Path, force: bool) -> Iterator[BinaryIO]:
    """Yield a temporary file in `path`'s folder; on success fsync and rename it to `path`.

    On any exception the temporary file is removed and `path` is left as it was.
    """
    check_output_file(path, force)
    remove_stale_temporaries(path)  # a killed earlier writer's
    fd, tmp = create_temporary(path)
    try:
        with os.fdopen(fd, "w+b") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        if Path(path).is_dir():
            raise UserInputError(f"output {path} is a directory, expected a file path")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success move it to `path` (replacing it)."""
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
        if path.exists():
            old = temporary_path(path, "old")
            old.mkdir()
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
