"""Prune one Linear from its statistics: initial mask, optional refinement, report.

Pure tensor code (no hooks, files, clocks or progress bars): :func:`select_weights` computes the
sparse weights, :func:`linear_report` describes them; the layer runner times the first
(``dsnot_deploy.layerwise.linear.prune_linear``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_deploy.algorithms.config import Method, PruneConfig, Refinement, Update
from dsnot_deploy.algorithms.dsnot import dsnot_refine, mean_error
from dsnot_deploy.algorithms.exact import exact_refine
from dsnot_deploy.algorithms.masks import magnitude_mask, wanda_mask
from dsnot_deploy.algorithms.reconstruct import model_target, reconstruct
from dsnot_deploy.algorithms.sparsegpt import sparsegpt_prune
from dsnot_deploy.algorithms.stats import ChannelStats


@dataclass(frozen=True)
class LinearReport:
    name: str
    rows: int
    cols: int
    zeros: int
    swaps_mean: float
    swaps_max: int
    # DSnoT's proxy: sum over rows of |mean error| (algorithms.md section 4), init -> final
    mean_error_init: float
    mean_error_final: float
    # true calibration output error, sum_i dw_i^T H dw_i / sum_i Wd_i^T H Wd_i (when H is known)
    output_error_init: float | None
    output_error_final: float | None
    mask_seconds: float

    @property
    def sparsity(self) -> float:
        return self.zeros / max(self.rows * self.cols, 1)


def _output_error(dense: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor) -> float:
    """sum_i dw_i^T H dw_i, float32 matmul with a float64 reduction (a report, not a decision)."""
    dw = dense - sparse
    return float(((dw @ hessian) * dw).sum(dtype=torch.float64))


@dataclass(frozen=True)
class Selection:
    """The result of :func:`select_weights`: float32 ``sparse`` weights (pruned entries +0.0), the
    initial ``init`` weights before refinement, swaps per row, and the (init, final) output errors
    when the refinement computed them."""

    dense: torch.Tensor
    init: torch.Tensor
    sparse: torch.Tensor
    swaps: torch.Tensor
    errors: tuple[float, float] | None
    refinement: Refinement
    hessian: torch.Tensor | None  # H on the weights' device, when the statistics hold X^T X


def shrink_toward_diagonal(hessian: torch.Tensor, shrink: float) -> torch.Tensor:
    """(1 - shrink) H + shrink diag(H): the same diagonal, off-diagonal terms scaled by 1 - shrink."""
    if not shrink:
        return hessian
    shrunk = hessian * (1.0 - shrink)
    shrunk.diagonal().copy_(hessian.diagonal())
    return shrunk


def select_weights(weight: torch.Tensor, stats: ChannelStats, config: PruneConfig, refine: bool = True) -> Selection:
    """Initial mask (magnitude / Wanda / SparseGPT) and refinement of one Linear; ``weight`` (rows, cols)."""
    dense = weight.detach().float()
    hessian = stats.hessian.to(dense.device) if stats.xtx is not None else None
    if config.method is Method.SPARSEGPT:
        assert hessian is not None
        sparse, mask = sparsegpt_prune(dense, hessian, config.pattern, config.sparsegpt)
    else:
        if config.method is Method.WANDA:
            mask = wanda_mask(dense, stats.sqnorm.to(dense.device), config.pattern)
        else:
            mask = magnitude_mask(dense, config.pattern, config.magnitude_scope)
        sparse = dense * mask
    init = sparse
    refinement = config.refinement if refine else Refinement.NONE
    swaps = torch.zeros(1, dtype=torch.long)
    errors: tuple[float, float] | None = None  # (init, final) output error when the refinement knows it
    if refinement is Refinement.DSNOT:
        result = dsnot_refine(
            dense,
            sparse,
            mask,
            stats.tokensum.to(dense.device),
            stats.variance(config.dsnot.variance).to(dense.device),
            stats.sqnorm.to(dense.device),
            config.pattern,
            config.dsnot,
        )
        sparse, swaps = result.weight, result.swaps
    elif refinement is Refinement.EXACT:
        assert hessian is not None
        searched = shrink_toward_diagonal(hessian, config.exact.shrink)
        result = exact_refine(dense, sparse, mask, searched, config.pattern, config.exact)
        sparse, swaps = result.weight, result.swaps
        if not config.exact.shrink:  # otherwise the search's objective is not the reported error
            errors = (float(result.objective_before.sum()), float(result.objective_after.sum()))
    if refinement is not Refinement.NONE:
        mask = result.mask
    if config.update is Update.ADMM:
        assert hessian is not None
        # what reconstruction matches: the dense Linear, or in part the dense model's outputs; statistics
        # without the dense model's inputs (a Linear pruned on its own) mean Xd = X, where the target is Wd
        target = dense
        if config.matches_dense_model and stats.cross is not None:
            target = model_target(dense, hessian, stats.cross.to(dense.device), config.reconstruct.damping,
                                  config.reconstruct.model_correction).float()
        sparse = reconstruct(target, sparse, mask, hessian, config.reconstruct).float()
        errors = None  # the refinement's (init, final) no longer describe the final weights
        for _ in range(config.reconstruct.rounds - 1 if refinement is Refinement.EXACT else 0):
            # alternate: search again against the reconstructed weights, then reconstruct the new mask
            again = exact_refine(dense, sparse, mask, searched, config.pattern, config.exact)
            swaps, mask = swaps + again.swaps, again.mask
            sparse = reconstruct(target, again.weight, mask, hessian, config.reconstruct).float()
    # W * mask leaves -0.0 where a negative weight was pruned; store every pruned weight as +0.0 so
    # that bit-level consumers (compact packs of F16/BF16 GGUFs, N:M detection) see one zero
    sparse = sparse + 0.0
    return Selection(dense, init, sparse, swaps, errors, refinement, hessian)


def linear_report(name: str, stats: ChannelStats, selection: Selection, mask_seconds: float) -> LinearReport:
    """Zeros, swaps, DSnoT's mean-error proxy and (with H) the true output errors of a selection."""
    dense, init, sparse, swaps, errors = (selection.dense, selection.init, selection.sparse, selection.swaps,
                                          selection.errors)
    hessian = selection.hessian
    tokensum = stats.tokensum.to(dense.device)
    out_init = out_final = None
    if hessian is not None:
        energy = max(_output_error(dense, torch.zeros_like(dense), hessian), 1e-30)
        if errors is None:
            final = _output_error(dense, sparse, hessian)
            errors = (_output_error(dense, init, hessian) if selection.refinement is not Refinement.NONE else final,
                      final)
        out_init, out_final = errors[0] / energy, errors[1] / energy
    return LinearReport(
        name=name,
        rows=dense.shape[0],
        cols=dense.shape[1],
        zeros=int((sparse == 0).sum()),
        swaps_mean=float(swaps.float().mean()),
        swaps_max=int(swaps.max()),
        mean_error_init=float(mean_error(dense, init, tokensum).abs().sum()),
        mean_error_final=float(mean_error(dense, sparse, tokensum).abs().sum()),
        output_error_init=out_init,
        output_error_final=out_final,
        mask_seconds=mask_seconds,
    )
