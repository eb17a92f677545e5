"""Saving a Hugging Face checkpoint atomically: a temporary sibling folder, fsync of every file,
the manifest last, then a rename (the previous checkpoint is restored if the rename fails);
temporaries of a killed run are found by pid and removed."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from dsnot_deploy.atomic import (
    exists_message,
    remove_tree,
    replace_into_place,
    temporary_path,
)
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.sources.models import one_line, text_config

logger = logging.getLogger(__name__)


def fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            fsync_path(Path(dirpath) / filename)
        fsync_path(Path(dirpath))


def checked_relative(name: str, what: str) -> Path:
    relative = Path(name)
    if not name or relative.is_absolute() or any(part in ("", ".", "..") for part in relative.parts):
        raise UserInputError(f"expected {what} to be a relative file name inside the checkpoint; found {name!r}")
    return relative


def _check_tied_embeddings(model: Any) -> None:
    """A checkpoint with tied embeddings stores one matrix; refuse to silently drop a different head."""
    cfg = text_config(model)
    if not getattr(cfg, "tie_word_embeddings", False):
        return
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return
    embed, head = get_in(), get_out()
    if embed is None or head is None or head.weight is embed.weight:
        return
    if head.weight.shape != embed.weight.shape or not torch.equal(head.weight, embed.weight):
        raise UserInputError(
            "expected the output head to equal the input embeddings (config.tie_word_embeddings is true); "
            "found two different matrices - saving would lose the output head"
        )


_TOKENIZER_PROBE = "Hello world! The quick brown fox jumps over the lazy dog.\n  0123456789 (a, b; c?)"


def verify_tokenizer_reload(tokenizer: Any, directory: Path) -> None:
    """Reload the saved tokenizer the way users will (AutoTokenizer, next to config.json) and compare.

    transformers 5 may pick a model-specific tokenizer class from ``config.json``'s model_type
    that rebuilds the pipeline around the saved vocab; a mismatch means a broken checkpoint.
    """
    from transformers import AutoTokenizer

    try:
        reloaded = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001
        raise UserInputError(f"the saved tokenizer does not reload: {one_line(error)}") from error
    expected = tokenizer(_TOKENIZER_PROBE)["input_ids"]
    found = reloaded(_TOKENIZER_PROBE)["input_ids"]
    if list(expected) != list(found):
        raise UserInputError(
            f"expected the saved tokenizer to reload identically; found {type(reloaded).__name__} encoding "
            f"{_TOKENIZER_PROBE!r} as {list(found)[:12]}... instead of {list(expected)[:12]}..."
        )


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    outdir: Path,
    extra_files: dict[str, bytes] | None = None,
    manifest_name: str | None = None,
    manifest: bytes | None = None,
    force: bool = False,
) -> None:
    """Write a Hugging Face checkpoint (safetensors, config, generation config, tokenizer) atomically.

    The tokenizer is reloaded from the written files and must encode a probe text identically.

    Everything goes into ``.OUTDIR.<pid>.d.tmp`` next to ``outdir``, is fsynced, the manifest (if any)
    is written last, then the directory is renamed into place (``dsnot_deploy.atomic``).  An existing
    ``outdir`` is an error unless ``force``; then it is replaced (old renamed aside, new renamed in,
    old deleted).  On any failure the temporary directory is removed and ``outdir`` is left as it was.
    """
    outdir = Path(outdir).expanduser().absolute()
    if (manifest_name is None) != (manifest is None):
        raise UserInputError(
            f"expected manifest_name and manifest to be given together; found manifest_name={manifest_name!r} "
            f"and manifest {'given' if manifest is not None else 'missing'}"
        )
    manifest_rel = checked_relative(manifest_name, "manifest_name") if manifest_name is not None else None
    extra = {checked_relative(name, "an extra file name"): data for name, data in (extra_files or {}).items()}
    if manifest_rel is not None and manifest_rel in extra:
        raise UserInputError(f"expected extra_files not to contain the manifest {manifest_name!r}; found it there")
    if outdir.exists() or outdir.is_symlink():
        if not force:
            raise UserInputError(exists_message(outdir))
    _check_tied_embeddings(model)

    parent = outdir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(outdir, "d")
    remove_tree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            verify_tokenizer_reload(tokenizer, tmp)
        for relative, data in extra.items():
            target = tmp / relative
            if target.exists():
                raise UserInputError(
                    f"expected extra file {str(relative)!r} not to overwrite a checkpoint file; "
                    f"found it already written"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if manifest_rel is not None and (tmp / manifest_rel).exists():
            raise UserInputError(f"expected manifest {manifest_name!r} not to overwrite a checkpoint file; found it")
        fsync_tree(tmp)
        if manifest_rel is not None and manifest is not None:
            target = tmp / manifest_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(manifest)
                handle.flush()
                os.fsync(handle.fileno())
            fsync_path(target.parent)
        replace_into_place(tmp, outdir, force)
    except BaseException as error:
        remove_tree(tmp)
        if isinstance(error, OSError):
            raise UserInputError(f"could not write the checkpoint to {outdir}: {one_line(error)}") from error
        raise
    logger.info("saved checkpoint to %s", outdir)
