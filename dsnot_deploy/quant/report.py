"""What in-refinement quantization did to one Linear (kept in the manifest and the resume state)."""

from __future__ import annotations

from dataclasses import dataclass


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
