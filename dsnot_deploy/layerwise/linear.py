"""One Linear pruned and timed: the layer runner's wrapper around the pure math of ``algorithms.pruner``."""

from __future__ import annotations

import time

import torch

from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.algorithms.pruner import LinearReport, linear_report, select_weights
from dsnot_deploy.algorithms.stats import ChannelStats


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
