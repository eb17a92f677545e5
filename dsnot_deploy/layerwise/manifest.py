"""The refinement manifest `sparsity.json`: what was done and how well (written last)."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from dsnot_deploy import __version__
from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.layerwise.driver import DriverResult, linear_group
from dsnot_deploy.sources.naming import source_naming

MANIFEST_NAME = "sparsity.json"
MANIFEST_SCHEMA = 1


def _enum_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _enum_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_enum_safe(v) for v in value]
    return getattr(value, "value", value)


def parameter_sparsity(model: nn.Module) -> dict[str, int]:
    """Zero count and size over all parameters (embeddings and lm_head included, counted once)."""
    zeros = total = 0
    for p in model.parameters():  # tied weights are yielded once
        zeros += int((p == 0).sum())
        total += p.numel()
    return {"zeros": zeros, "params": total}


def build_manifest(
    model: nn.Module,
    prune: PruneConfig,
    result: DriverResult,
    calibration: dict[str, Any],
    model_source: str,
    layers_path: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    linears = [lin for layer in result.layers for lin in layer.linears]
    zeros = sum(lin.zeros for lin in linears)
    size = sum(lin.rows * lin.cols for lin in linears)
    params = parameter_sparsity(model)
    per_layer = []
    for layer in result.layers:
        lz = sum(lin.zeros for lin in layer.linears)
        ls = sum(lin.rows * lin.cols for lin in layer.linears)
        per_layer.append({"index": layer.index, "sparsity": lz / max(ls, 1), "seconds": layer.seconds})
    errors_known = [lin for lin in linears if lin.output_error_init is not None]
    summary_error = None
    if errors_known:
        summary_error = {
            "mean_relative_output_error_init": sum(lin.output_error_init for lin in errors_known) / len(errors_known),
            "mean_relative_output_error_final": sum(lin.output_error_final for lin in errors_known) / len(errors_known),
            "linears_improved": sum(lin.output_error_final < lin.output_error_init for lin in errors_known),
            "linears_worsened": sum(lin.output_error_final > lin.output_error_init for lin in errors_known),
            "linears": len(errors_known),
        }
    manifest: dict[str, Any] = {
        "schema": MANIFEST_SCHEMA,
        "tool": {"name": "dsnot-deploy", "version": __version__},
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
        },
        "model": {"source": model_source, "decoder_layers": layers_path, "class": type(model).__name__,
                  "naming": source_naming(model_source)},
        "method": prune.method.value,
        "refinement": prune.refinement.value,
        "update": prune.update.value,
        "pattern": {
            "kind": "n:m" if prune.pattern.is_nm else "unstructured",
            "n": prune.pattern.n or None,
            "m": prune.pattern.m or None,
            "target_sparsity": prune.pattern.sparsity,
        },
        "settings": _enum_safe(asdict(prune)),
        "calibration": calibration,
        "sparsity": {
            "pruned_linears": zeros / max(size, 1),
            "pruned_linears_zeros": zeros,
            "pruned_linears_params": size,
            "all_parameters": params["zeros"] / max(params["params"], 1),
            "all_parameters_zeros": params["zeros"],
            "all_parameters_params": params["params"],
            "per_layer": per_layer,
        },
        "error": summary_error,
        "linears": [
            {**asdict(lin), "group": linear_group(lin.name.split(".", 1)[1]), "sparsity": lin.sparsity}
            for lin in linears
        ],
        "times": {"mask_seconds": result.mask_seconds, "layers_seconds": result.seconds},
    }
    if extra:
        manifest.update(extra)
    return manifest


def pipeline_name(manifest: dict[str, Any]) -> str:
    """``method+refinement[+update][+allocation]`` of a manifest, e.g. ``wanda+exact+admm``."""
    parts = [manifest.get("method", "?"), manifest.get("refinement", "?")]
    if manifest.get("update", "none") != "none":
        parts.append(manifest["update"])
    if (manifest.get("allocation") or {}).get("kind", "uniform") != "uniform":
        parts.append(manifest["allocation"]["kind"])
    return "+".join(str(p) for p in parts)


def dumps(manifest: dict[str, Any]) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=False) + "\n").encode()
