"""The output head (and, when tied, the token embedding) onto the target's lattice, GPTQ-style.

In a plain Q4_0 / Q5_0 file the tied token embedding is stored at 4-5 bits like every Linear; measured
on SmolLM2, after the decoder Linears are swept it is the larger part of what Q4_0 still loses
(docs/quantize.md).  As an output head it is a Linear whose inputs are the final normalised hidden
states, so the same sweep applies: ``H`` from the last decoder layer's outputs of the calibration
windows through the model's final norm, error feedback along the hidden dimension (the embedding's
GGUF block layout).  The embedding lookup then reads the same rounded rows.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.quant.gptq import QuantizeConfig, quantize_weight
from dsnot_deploy.quant.report import QuantReport, quant_report
from dsnot_deploy.quant.targets import PRESETS, base_lattice

log = logging.getLogger(__name__)

HEAD_NAME = "lm_head"


def final_norm(model: nn.Module, layers_path: str) -> nn.Module | None:
    """The norm applied after the decoder layers: ``<parent of the layer list>.norm`` (None if absent)."""
    parent: nn.Module = model
    for part in layers_path.split(".")[:-1]:
        parent = getattr(parent, part)
    norm = getattr(parent, "norm", None)
    return norm if isinstance(norm, nn.Module) else None


def head_hessian(norm: nn.Module, hidden: torch.Tensor, batch: int = 8) -> torch.Tensor:
    """H of the head's inputs ``norm(hidden)`` (samples, tokens, cols) over the calibration windows, with
    the calibration statistics' convention (``ChannelStats.hessian``)."""
    stats = ChannelStats(hidden.shape[-1], with_hessian=True)
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch):
            accumulate(stats, norm(hidden[start:start + batch]))
    return stats.hessian


def quantize_head(model: nn.Module, layers_path: str, hidden: torch.Tensor,
                  config: QuantizeConfig) -> QuantReport | None:
    """Put the output head (tied embedding included) on the lattice of a single-type target, in place.

    ``hidden``: the last decoder layer's outputs on the calibration windows.  Presets keep their
    embedding plan (Q8_0, written by llama.cpp) and are skipped, as are models without a final norm
    or an output Linear; None then."""
    if config.type.upper() in PRESETS or not config.head:
        return None
    head = model.get_output_embeddings()
    norm = final_norm(model, layers_path)
    if not isinstance(head, nn.Linear) or norm is None:
        log.warning("no output Linear and final norm found; the output head is not quantized")
        return None
    weight = head.weight
    if weight.dtype != torch.float32:
        log.warning("output head in %s: not quantized (lattice values need float32)", weight.dtype)
        return None
    lattice = base_lattice(config.type)
    if weight.shape[1] % lattice.block:
        log.warning("output head rows of %d are not whole %s blocks; not quantized", weight.shape[1], lattice.name)
        return None
    hessian = head_hessian(norm, hidden.to(weight.device, weight.dtype))
    t0 = time.perf_counter()
    start = weight.detach().to("cpu", torch.float32)
    result = quantize_weight(start, hessian, config, lattice)
    seconds = time.perf_counter() - t0
    weight.data.copy_(result.weight.to(weight.device))  # a tied embedding shares this tensor
    report = quant_report(HEAD_NAME, lattice.name, start, result, hessian, seconds)
    log.info("output head on %s: relative calibration error %.5f (round-to-nearest %.5f), %.1f s", lattice.name,
             report.error_sweep if result.used_sweep else report.error_rtn, report.error_rtn, seconds)
    return report
