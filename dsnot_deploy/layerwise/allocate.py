"""The dense pass that measures each decoder layer's outlier ratio, and the allocation it gives.

OWL scores the dense model (docs/allocation.md): every layer runs unpruned on the
calibration batches, its Linears' Wanda scores |W| * ||X|| are taken from its own inputs, and
the inputs of the next layer are the dense outputs. Nothing is modified; the pruning pass then
runs with the per-layer counts. One extra forward of each layer on the calibration set, twice on
the whole model (statistics, then propagation).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from dsnot_deploy.algorithms.allocation import LayerAllocation, allocate, outlier_ratio
from dsnot_deploy.algorithms.config import Allocation
from dsnot_deploy.algorithms.masks import wanda_scores
from dsnot_deploy.layerwise.capture import LayerCall
from dsnot_deploy.layerwise.driver import DriverConfig, _calibrate, _linears, run_layers

if TYPE_CHECKING:
    from dsnot_deploy.layerwise.stream import StreamPlan
    from dsnot_deploy.sources.streaming_io import SafetensorsCheckpoint

log = logging.getLogger(__name__)


class OutlierObserver:
    """A ``before_layer`` hook that records each layer's outlier ratio and Linear shapes."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.ratios: list[float] = []
        self.shapes: list[dict[str, tuple[int, int]]] = []

    def __call__(self, index: int, layer: nn.Module, hidden: torch.Tensor, call: LayerCall,
                 config: DriverConfig) -> None:
        linears = _linears(layer)
        stats = _calibrate(layer, linears, hidden, call, config, with_hessian=False)
        called = {name: mod for name, mod in linears.items() if name in stats}
        with torch.no_grad():
            scores = [wanda_scores(mod.weight, stats[name].sqnorm.to(mod.weight.device))
                      for name, mod in called.items()]
            self.ratios.append(outlier_ratio(scores, self.threshold))
        self.shapes.append({name: (mod.out_features, mod.in_features) for name, mod in called.items()})


def _wanted(config: DriverConfig) -> bool:
    prune = config.prune
    if prune is None:
        return False
    if prune.allocation.kind is Allocation.OWL and prune.pattern.is_nm:
        log.warning("allocation %s does not apply to N:M patterns (every group of M prunes N); every layer "
                    "stays at %s", prune.allocation.kind.value, prune.pattern.describe())
    return prune.allocates


def _finish(observer: OutlierObserver, config: DriverConfig) -> LayerAllocation:
    prune = config.prune
    assert prune is not None
    result = allocate(observer.ratios, observer.shapes, prune.pattern.sparsity, prune.allocation)
    log.info("%s allocation: layer sparsity %.3f..%.3f (outlier ratios %.4f..%.4f)",
             prune.allocation.resolved(prune.pattern).value,
             min(result.layer_sparsity), max(result.layer_sparsity), min(result.outlier_ratios),
             max(result.outlier_ratios))
    return result


def plan_allocation(model: nn.Module, layers: nn.ModuleList, samples: torch.Tensor,
                    config: DriverConfig) -> LayerAllocation | None:
    """The per-layer counts for ``config.prune`` (None when it prunes every layer alike)."""
    if not _wanted(config):
        return None
    observer = OutlierObserver(config.prune.allocation.outlier_threshold)
    run_layers(model, layers, samples, replace(config, prune=None, allocation=None, measure_error=False),
               before_layer=observer)
    return _finish(observer, config)


class _DiscardingWriter:
    """Stands in for the shard writer during the streamed dense pass: takes shards, keeps nothing."""

    def __init__(self, n_shards: int) -> None:
        self.n_shards = n_shards

    def write_shard(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        return None


def plan_allocation_streamed(skeleton: nn.Module, checkpoint: SafetensorsCheckpoint, samples: torch.Tensor,
                             config: DriverConfig, plan: StreamPlan) -> LayerAllocation | None:
    """``plan_allocation`` for ``--stream``: the dense pass streams the layers from the checkpoint too."""
    if not _wanted(config):
        return None
    from dsnot_deploy.layerwise.stream import stream_layers

    observer = OutlierObserver(config.prune.allocation.outlier_threshold)
    stream_layers(skeleton, checkpoint, samples, replace(config, prune=None, allocation=None, measure_error=False),
                  _DiscardingWriter(plan.n_shards), plan=plan, before_layer=observer)  # type: ignore[arg-type]
    return _finish(observer, config)
