"""The dense side of a validation: a GGUF as is, or a model exported to the sparse file's type and
cached by content hash under ``$XDG_CACHE_HOME/dsnot-deploy/gguf``."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.progress import Progress
from dsnot_deploy.sources.aliases import cache_root

logger = logging.getLogger(__name__)

# Checkpoint files that define a dense model's content (weights, config, tokenizer).
_CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".bin", ".tiktoken")
_CACHE_FORMAT = "dsnot-dense-gguf-v2"  # v2: general.* naming keys of the source


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dsnot-deploy/gguf`` (``~/.cache/dsnot-deploy/gguf`` when unset)."""
    return cache_root() / "gguf"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digest(directory: Path) -> str:
    """sha256 over the names and contents of a checkpoint's weight, config and tokenizer files."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(directory).rglob("*")
                   if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserInputError(f"expected weight/config files in the checkpoint {directory}, found none")
    for path in files:
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def dense_gguf_for(spec: str, qtype: str, cache_dir: Path | None = None, progress: Progress = True,
                   gguf_as_is: bool = True) -> tuple[Path, dict[str, Any]]:
    """The dense GGUF to compare with: ``spec`` itself if it is a GGUF file (and ``gguf_as_is``),
    else ``spec`` exported.

    A model spec (checkpoint directory, alias, GGUF file, Hub id; see ``dsnot_deploy.sources.models``) is
    exported at ``qtype`` with ``converters.gguf_export`` into ``cache_dir`` under a name derived from
    the sha256 of its content (the checkpoint files, or the GGUF file it is dequantized from) and
    ``qtype``, so a second run reuses it. A GGUF source is dequantized and saved as a checkpoint
    first (as ``refine`` reads it). The file appears atomically (exported in a temporary folder of the
    cache, then renamed). Returns the path and a description for the report.
    """
    path = Path(spec).expanduser()
    if gguf_as_is and path.is_file():
        from converters.gguf_info import check_gguf_file

        return check_gguf_file(path, "dense GGUF"), {"kind": "gguf", "spec": spec}
    from dsnot_deploy.sources.materialize import save_as_checkpoint
    from dsnot_deploy.sources.naming import naming_of
    from dsnot_deploy.sources.specs import resolve_model_source

    source = resolve_model_source(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dense-", dir=cache_dir))
    try:
        if source.kind == "local-dir":
            checkpoint, content = Path(source.location), None
        elif source.kind in ("alias-gguf", "gguf") and source.path is not None:
            checkpoint, content = None, "gguf:" + sha256_file(source.path)
        else:
            checkpoint, content = save_as_checkpoint(spec, staging / "checkpoint"), None
        if content is None:
            content = "checkpoint:" + checkpoint_digest(checkpoint)
        key = hashlib.sha256(f"{_CACHE_FORMAT}\n{content}\n{qtype}".encode()).hexdigest()[:32]
        target = cache_dir / f"dense-{key}-{qtype}.gguf"
        info = {"kind": source.kind, "spec": spec, "qtype": qtype, "content": content, "cache": str(target)}
        if target.is_file():
            logger.info("dense GGUF from cache: %s", target)
            return target, {**info, "cached": True}
        if checkpoint is None:
            checkpoint = save_as_checkpoint(spec, staging / "checkpoint")
        from converters.gguf_export import ExportConfig, export_gguf

        logger.info("exporting the dense model %s to %s (%s)", spec, target.name, qtype)
        out = staging / target.name
        naming = tuple(naming_of(source).items())
        report = export_gguf(checkpoint, out, ExportConfig(qtype=qtype, progress=progress, naming=naming))
        os.replace(out, target)
        return target, {**info, "cached": False, "export": _small(report)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _small(report: Any) -> Any:
    """An export report without bulky per-tensor lists (kept in the exporter's own JSON)."""
    if not isinstance(report, dict):
        return report
    return {k: v for k, v in report.items() if not (isinstance(v, list) and len(v) > 64)}


def export_qtype(sparse: Path, info: Any) -> str:
    """The type name to export the dense model at: the sparse file's export record if it has one
    (``SPARSE.gguf.export.json``, written by the exporter), else its ``general.file_type``."""
    import json

    record = Path(str(sparse) + ".export.json")
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            data = {}
        value = data.get("type")  # the exporter's report: {"type": "Q8_0", ...}
        if isinstance(value, str) and value:
            return value
    return info.file_type_name
