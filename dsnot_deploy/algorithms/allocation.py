"""Layer-wise sparsity allocation (docs/allocation.md): uniform, or OWL's outlier-weighted rule.

Pure numbers and tensors (no hooks or models; ``dsnot_deploy.layerwise.allocate`` runs the dense
pass that measures the outlier ratios).

OWL (Yin et al. 2024, "Outlier Weighed Layerwise Sparsity"): a decoder layer's outlier ratio D_l is
the fraction of its Wanda scores |W_ij| * ||X_j|| (all its Linears together) above M times their
mean. The ratios are scaled linearly onto [0, 2 lambda], centred on the target density 1 - s, and
a layer keeps that density: layers with more outliers are pruned less, the spread is at most
2 lambda.

The counts are integers chosen so that the model prunes exactly as many weights as uniform
per-row pruning would (sum over Linears of rows * floor(cols * s)): for every Linear name, the
per-row counts over the layers sum to n_layers * floor(cols * s), each as close as possible to
cols * s_l (largest remainder), never 0 nor cols.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from dsnot_deploy.algorithms.config import Allocation, AllocationConfig, SparsityPattern
from dsnot_deploy.algorithms.masks import prune_count


def outlier_ratio(scores: Sequence[torch.Tensor], threshold: float) -> float:
    """Fraction of all entries of ``scores`` (one layer's Wanda scores) above threshold x their mean
    (two passes over the tensors, no concatenated copy)."""
    numel = sum(s.numel() for s in scores)
    if numel == 0:
        return 0.0
    bound = sum(float(s.sum(dtype=torch.float64)) for s in scores) / numel * threshold
    return sum(int((s.double() > bound).sum()) for s in scores) / numel


def owl_sparsities(ratios: Sequence[float], target: float, spread: float) -> list[float]:
    """Per-layer sparsity from outlier ratios: mean ``target``, range at most 2 * ``spread``; more
    outliers, lower sparsity. All ratios equal (or one layer): uniform."""
    if not ratios:
        return []
    low, high = min(ratios), max(ratios)
    if not high > low:
        return [target] * len(ratios)
    scaled = [(r - low) / (high - low) * 2.0 * spread for r in ratios]
    mean = sum(scaled) / len(scaled)
    return [target - (x - mean) for x in scaled]


def integer_counts(ideal: Sequence[float], total: int, low: int, high: int) -> list[int]:
    """Integers in [low, high] summing to ``total``, each as close to ``ideal`` as the sum allows
    (the ideals are first shifted to sum to ``total``; then largest remainder)."""
    n = len(ideal)
    if not n * low <= total <= n * high:
        raise ValueError(f"cannot split {total} into {n} integers in [{low}, {high}]")
    shift = (total - sum(ideal)) / n
    target = [x + shift for x in ideal]
    counts = [min(max(math.floor(x), low), high) for x in target]
    while sum(counts) < total:  # give one more where the ideal is furthest above the count
        i = max((j for j in range(n) if counts[j] < high), key=lambda j: target[j] - counts[j])
        counts[i] += 1
    while sum(counts) > total:
        i = min((j for j in range(n) if counts[j] > low), key=lambda j: target[j] - counts[j])
        counts[i] -= 1
    return counts


@dataclass(frozen=True)
class LayerAllocation:
    """What each decoder layer prunes: per layer, per Linear name inside it, weights per row."""

    config: AllocationConfig
    target: float  # the model-level sparsity asked for
    outlier_ratios: tuple[float, ...]
    layer_sparsity: tuple[float, ...]  # the rule's per-layer sparsity, before rounding to counts
    counts: tuple[Mapping[str, int], ...]
    cols: Mapping[str, int]

    def pattern(self, layer: int, name: str, default: SparsityPattern) -> SparsityPattern:
        """The unstructured pattern that prunes this Linear's count per row (``default`` if unknown)."""
        count = self.counts[layer].get(name) if layer < len(self.counts) else None
        if count is None:
            return default
        return SparsityPattern.unstructured(count / self.cols[name])

    def record(self) -> dict[str, Any]:
        """The manifest's ``allocation`` entry."""
        requested = {"requested": self.config.kind.value} if self.config.kind is not Allocation.OWL else {}
        return {
            "kind": Allocation.OWL.value,
            **requested,
            "outlier_threshold": self.config.outlier_threshold,
            "spread": self.config.spread,
            "target_sparsity": self.target,
            "outlier_ratios": list(self.outlier_ratios),
            "layer_sparsity_rule": list(self.layer_sparsity),
            "per_row_counts": [dict(c) for c in self.counts],
        }


def allocate(ratios: Sequence[float], shapes: Sequence[Mapping[str, tuple[int, int]]], target: float,
             config: AllocationConfig) -> LayerAllocation:
    """Per-row counts per layer and Linear from the outlier ratios; ``shapes[l][name] = (rows, cols)``.

    A Linear name whose uniform count is 0 (cols * s < 1) is left to the uniform rule."""
    if len(ratios) != len(shapes):
        raise ValueError(f"expected one outlier ratio per layer; found {len(ratios)} for {len(shapes)} layers")
    sparsity = owl_sparsities(ratios, target, config.spread)
    counts: list[dict[str, int]] = [{} for _ in shapes]
    cols: dict[str, int] = {}
    names = sorted({name for layer in shapes for name in layer})
    for name in names:
        where = [i for i, layer in enumerate(shapes) if name in layer]
        widths = {shapes[i][name][1] for i in where}
        if len(widths) != 1:
            raise ValueError(f"expected {name} to have one width in every layer; found {sorted(widths)}")
        width = widths.pop()
        uniform = prune_count(width, target)
        if uniform == 0:
            continue
        ideal = [width * sparsity[i] for i in where]
        for i, k in zip(where, integer_counts(ideal, uniform * len(where), 1, width - 1), strict=True):
            counts[i][name] = k
        cols[name] = width
    return LayerAllocation(config, target, tuple(ratios), tuple(sparsity), tuple(counts), cols)
