"""One Linear pruned (or quantized) and timed: the layer runner's wrappers around the pure math of
``algorithms.pruner`` and ``quant.gptq``."""

from __future__ import annotations

import logging
import time

import torch

from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.algorithms.pruner import LinearReport, linear_report, select_weights
from dsnot_deploy.algorithms.stats import ChannelStats
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.quant.gptq import QuantizeConfig, quantize_weight
from dsnot_deploy.quant.report import QuantReport, quant_report

log = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prune_linear(
    name: str, weight: torch.Tensor, stats: ChannelStats, config: PruneConfig, refine: bool = True
) -> tuple[torch.Tensor, LinearReport]:
    """Return (new float32 weight with exact zeros, report); ``mask_seconds`` times the selection alone
    (queued CUDA work included)."""
    _sync(weight.device)
    t0 = time.perf_counter()
    selection = select_weights(weight, stats, config, refine)
    _sync(weight.device)
    mask_seconds = time.perf_counter() - t0
    return selection.sparse, linear_report(name, stats, selection, mask_seconds)


def quantize_linear(
    name: str, weight: torch.Tensor, stats: ChannelStats, config: QuantizeConfig
) -> tuple[torch.Tensor, QuantReport] | None:
    """Return (float32 weight on its lattice under ``config.type``, report), or None for a Linear whose
    rows are not whole blocks (left as they are: `export` writes such tensors in F16) or that a preset
    plans at a type without a lattice here (left for llama.cpp's quantizer)."""
    if weight.dtype != torch.float32:
        raise UserInputError(f"expected float32 weights for in-refinement quantization (lattice values need "
                             f"24-bit mantissas); found {weight.dtype} in {name}: refine with --dtype float32")
    lattice = config.lattice_for(name, weight.shape[1])
    if lattice is None:
        log.info("%s: %s plans a type without a lattice here for it; left for llama.cpp's quantizer at export",
                 name, config.type)
        return None
    if weight.shape[1] % lattice.block:
        log.warning("%s: rows of %d are not whole %s blocks of %d; not quantized", name, weight.shape[1],
                    lattice.name, lattice.block)
        return None
    hessian = stats.hessian.to(weight.device)
    _sync(weight.device)
    t0 = time.perf_counter()
    result = quantize_weight(weight, hessian, config, lattice)
    _sync(weight.device)
    seconds = time.perf_counter() - t0
    report = quant_report(name, lattice.name, weight.detach().float(), result, hessian, seconds)
    return result.weight, report
