"""What in-refinement quantization did to one Linear (kept in the manifest and the resume state)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_deploy.algorithms.reconstruct import output_error
from dsnot_deploy.quant.gptq import QuantizeResult


@dataclass(frozen=True)
class QuantReport:
    """Calibration output errors of ggml's round-to-nearest and of the GPTQ sweep, each relative to
    the energy ``sum_i w_i^T H w_i`` of the weights before quantization; ``method`` is what was kept."""

    name: str
    type: str
    error_rtn: float
    error_sweep: float
    method: str  # "gptq" or "rtn"
    seconds: float
    zeros_added: int = 0  # kept weights whose nearest level was 0 (pruned ones stay 0 and are not counted)


def quant_report(name: str, type_name: str, start: torch.Tensor, result: QuantizeResult, hessian: torch.Tensor,
                 seconds: float) -> QuantReport:
    """The report of one quantized matrix (``start``: its float32 weights before): the errors relative to
    the energy of ``start`` under ``hessian``."""
    energy = max(output_error(start, torch.zeros_like(start), hessian), 1e-30)
    return QuantReport(name=name, type=type_name, error_rtn=result.error_rtn / energy,
                       error_sweep=result.error_sweep / energy, method="gptq" if result.used_sweep else "rtn",
                       seconds=seconds, zeros_added=int((result.weight == 0).sum()) - int((start == 0).sum()))
