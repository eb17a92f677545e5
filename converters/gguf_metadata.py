"""Metadata a GGUF carries about its model: the general.* naming keys (from the model source, the
way llama.cpp's converter names models) and the dsnot.* provenance of a refined checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf

from dsnot_deploy import __version__

from .hf_source import HFCheckpoint


def write_dsnot_metadata(w: gguf.GGUFWriter, manifest: dict[str, Any] | None) -> None:
    w.add_string("dsnot.export.version", __version__)
    if manifest is None:
        return
    w.add_string("dsnot.tool_version", str(manifest.get("tool", {}).get("version", "")))
    w.add_string("dsnot.method", str(manifest.get("method", "")))
    w.add_string("dsnot.refinement", str(manifest.get("refinement", "")))
    w.add_string("dsnot.update", str(manifest.get("update", "none")))
    w.add_string("dsnot.allocation", str((manifest.get("allocation") or {}).get("kind", "uniform")))
    pattern = manifest.get("pattern", {})
    kind = "unstructured" if pattern.get("kind") != "n:m" else f"{pattern.get('n')}:{pattern.get('m')}"
    w.add_string("dsnot.pattern", kind)
    if pattern.get("target_sparsity") is not None:
        w.add_float32("dsnot.sparsity", float(pattern["target_sparsity"]))
    sparsity = manifest.get("sparsity", {})
    if "pruned_linears" in sparsity:
        w.add_float32("dsnot.sparsity.achieved", float(sparsity["pruned_linears"]))
    per_layer = [float(layer["sparsity"]) for layer in sparsity.get("per_layer", [])]
    if per_layer:
        w.add_array("dsnot.sparsity.per_layer", per_layer)
    for key, value in (manifest.get("calibration") or {}).items():
        if isinstance(value, bool | int | float | str) and not isinstance(value, bool):
            if isinstance(value, str):
                w.add_string(f"dsnot.calibration.{key}", value)
            elif isinstance(value, int):
                w.add_uint32(f"dsnot.calibration.{key}", value) if value >= 0 else w.add_int32(
                    f"dsnot.calibration.{key}", value)
            else:
                w.add_float32(f"dsnot.calibration.{key}", float(value))
    source = manifest.get("model", {}).get("source")
    if source:
        w.add_string("dsnot.model.source", str(source))


NAMING_WRITERS = {"name": "add_name", "basename": "add_basename", "finetune": "add_finetune",
                   "organization": "add_organization", "size_label": "add_size_label", "license": "add_license",
                   "version": "add_version"}


def naming_keys(ckpt: HFCheckpoint, given: tuple[tuple[str, str], ...] | None, n_params: int) -> dict[str, str]:
    """The general.* naming keys: the source's as recorded by refine, else ``given`` (what the caller
    knows of the source, ``dsnot_deploy.sources.naming``), else the last part of config.json's
    ``_name_or_path`` or the folder name; the size label from the parameter count when the source
    has none (llama.cpp's rule: 135M, 1.2B, ...)."""
    naming = dict(((ckpt.manifest or {}).get("model") or {}).get("naming") or {}) or dict(given or ())
    if not naming.get("name"):
        naming["name"] = Path(str(ckpt.config.get("_name_or_path") or "")).name or ckpt.root.resolve().name
    if not naming.get("size_label"):
        naming["size_label"] = gguf.size_label(n_params, 0, 0, 0)
    return {k: str(v) for k, v in naming.items() if k in NAMING_WRITERS and v}


def manifest_summary(manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    if manifest is None:
        return None
    return {k: manifest.get(k) for k in ("method", "refinement", "pattern", "calibration")} | {
        "sparsity": (manifest.get("sparsity") or {}).get("pruned_linears")}
