"""SparseGPT: mask selection with the OBS weight update (algorithms.md section 3)."""

from __future__ import annotations

import torch

from dsnot_deploy.algorithms.config import SparseGPTConfig, SparsityPattern
from dsnot_deploy.algorithms.masks import check_shape, prune_count


def _prune_lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Bool tensor of scores' shape, True at the `count` lowest entries (stable)."""
    flat = scores.reshape(-1)
    pruned = torch.zeros_like(flat, dtype=torch.bool)
    if count:
        pruned[torch.sort(flat, stable=True).indices[:count]] = True
    return pruned.reshape(scores.shape)


def _inverse_cholesky_upper(hessian: torch.Tensor) -> torch.Tensor:
    """Upper Cholesky factor of H^-1, retried in float64 if float32 is not positive definite."""
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True)
    except torch.linalg.LinAlgError:
        h64 = hessian.double()
        inv = torch.cholesky_inverse(torch.linalg.cholesky(h64))
        return torch.linalg.cholesky(inv, upper=True).to(hessian.dtype)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    config: SparseGPTConfig = SparseGPTConfig(),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (updated float32 weight with exact zeros at pruned entries, kept-mask)."""
    check_shape(weight.shape, pattern)
    W = weight.detach().float().clone()  # (rows, cols)
    H = hessian.detach().float().clone()  # (cols, cols)
    rows, cols = W.shape
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    damp = config.percdamp * torch.mean(torch.diag(H))
    H.diagonal().add_(damp)
    U = _inverse_cholesky_upper(H)  # (cols, cols), upper

    blocksize = config.blocksize
    if pattern.is_nm:  # N:M groups must not straddle blocks
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()  # (rows, bs)
        U1 = U[i1:i2, i1:i2]
        d1 = torch.diag(U1)
        Err1 = torch.zeros_like(W1)
        P1 = torch.zeros_like(W1, dtype=torch.bool)
        if not pattern.is_nm:  # cumulative counts: the matrix prunes exactly floor(rows * cols * s)
            count = prune_count(rows * i2, pattern.sparsity) - prune_count(rows * i1, pattern.sparsity)
            P1 = _prune_lowest(W1.pow(2) / d1.pow(2).unsqueeze(0), count)
        for i in range(i2 - i1):
            if pattern.is_nm and i % pattern.m == 0:
                group = W1[:, i : i + pattern.m].pow(2) / d1[i : i + pattern.m].pow(2).unsqueeze(0)
                order = torch.sort(group, dim=1, stable=True).indices[:, : pattern.n]
                P1[:, i : i + pattern.m].scatter_(1, order, True)
            w = W1[:, i]
            q = torch.where(P1[:, i], torch.zeros_like(w), w)
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) * U1[i, i:].unsqueeze(0)
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        if i2 < cols:
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    W[pruned] = 0.0
    return W, ~pruned
