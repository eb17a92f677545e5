"""Initial masks from scores (algorithms.md section 3). A mask is bool, True = kept.

Ranking is stable (ties pruned in column order) and counts are exact: every row of an
unstructured per-row mask prunes exactly floor(cols * s) weights, every group of M prunes N.
"""

from __future__ import annotations

import math

import torch

from dsnot_deploy.algorithms.config import MagnitudeScope, SparsityPattern
from dsnot_deploy.errors import UserInputError


def check_shape(weight_shape: torch.Size | tuple[int, ...], pattern: SparsityPattern) -> None:
    if pattern.is_nm and weight_shape[1] % pattern.m:
        raise UserInputError(
            f"N:M pattern {pattern.n}:{pattern.m} needs in_features divisible by {pattern.m}; "
            f"found a Linear with {weight_shape[1]} columns"
        )


def working_copies(dense: torch.Tensor, sparse: torch.Tensor, mask: torch.Tensor,
                   pattern: SparsityPattern) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What a mask refinement works on, after checking the shape: float32 dense weights (rows, cols)
    and its own copies of the sparse weights and the mask."""
    check_shape(dense.shape, pattern)
    return dense.detach().float(), sparse.detach().float().clone(), mask.clone()


def prune_count(size: int, sparsity: float) -> int:
    """floor(size * sparsity), robust to the product landing a rounding error below an integer
    (0.7 * 90 = 62.99999999999999 is 63; count / size * size is count)."""
    return int(math.floor(size * sparsity + 1e-6))


def wanda_scores(weight: torch.Tensor, sqnorm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * sqrt(sqnorm_j), float32, (rows, cols)."""
    return weight.float().abs() * sqnorm.float().sqrt().unsqueeze(0)


def per_row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the prune_count(cols, sparsity) lowest scores of every row."""
    rows, cols = scores.shape
    n_prune = prune_count(cols, sparsity)
    mask = torch.ones(rows, cols, dtype=torch.bool, device=scores.device)
    if n_prune:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]
        mask.scatter_(1, order, False)
    return mask


def per_matrix_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Prune the prune_count(numel, sparsity) lowest scores of the whole matrix."""
    flat = scores.reshape(-1)
    n_prune = prune_count(flat.numel(), sparsity)
    mask = torch.ones_like(flat, dtype=torch.bool)
    if n_prune:
        order = torch.sort(flat, stable=True).indices[:n_prune]
        mask[order] = False
    return mask.reshape(scores.shape)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """In every group of m consecutive columns of a row, prune the n lowest scores."""
    rows, cols = scores.shape
    groups = scores.reshape(rows, cols // m, m)  # (rows, groups, m)
    order = torch.sort(groups, dim=2, stable=True).indices[:, :, :n]
    mask = torch.ones_like(groups, dtype=torch.bool)
    mask.scatter_(2, order, False)
    return mask.reshape(rows, cols)


def mask_from_scores(
    scores: torch.Tensor, pattern: SparsityPattern, scope: MagnitudeScope = MagnitudeScope.PER_ROW
) -> torch.Tensor:
    check_shape(scores.shape, pattern)
    if pattern.is_nm:
        return nm_mask(scores, pattern.n, pattern.m)
    if scope is MagnitudeScope.PER_MATRIX:
        return per_matrix_mask(scores, pattern.sparsity)
    return per_row_mask(scores, pattern.sparsity)


def magnitude_mask(
    weight: torch.Tensor, pattern: SparsityPattern, scope: MagnitudeScope = MagnitudeScope.PER_ROW
) -> torch.Tensor:
    return mask_from_scores(weight.float().abs(), pattern, scope)


def wanda_mask(weight: torch.Tensor, sqnorm: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    return mask_from_scores(wanda_scores(weight, sqnorm), pattern, MagnitudeScope.PER_ROW)
