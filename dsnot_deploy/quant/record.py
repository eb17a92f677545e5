"""The manifest's ``quantize`` entry: the lattice, the settings, and what each Linear kept."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from dsnot_deploy.layerwise.driver import DriverResult
from dsnot_deploy.quant.gptq import QuantizeConfig
from dsnot_deploy.quant.report import QuantReport


def quantize_record(config: QuantizeConfig | None, result: DriverResult,
                    head: QuantReport | None = None) -> dict[str, Any]:
    """``{"quantize": {...}}`` for a run that quantized (``head``: the output head's report), ``{}`` otherwise."""
    if config is None:
        return {}
    reports = [q for layer in result.layers for q in layer.quant]
    n = max(len(reports), 1)
    return {"quantize": {
        "type": config.type,
        "settings": {"damping": config.damping, "blocksize": config.blocksize, "shrinks": list(config.shrinks),
                     "diag_shrink": config.diag_shrink, "scales": config.scales, "head": config.head},
        "linears_quantized": len(reports),
        "linears_gptq": sum(q.method == "gptq" for q in reports),
        "mean_relative_error_rtn": sum(q.error_rtn for q in reports) / n,
        "mean_relative_error": sum(min(q.error_rtn, q.error_sweep) for q in reports) / n,
        "seconds": sum(q.seconds for q in reports),
        "zeros_added": sum(q.zeros_added for q in reports),
        "linears": [asdict(q) for q in reports],
        **({"head": asdict(head)} if head is not None else {}),
    }}
