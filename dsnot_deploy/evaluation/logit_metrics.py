"""Per-chunk comparison of two models' logits: NLL of each, KL(dense || sparse) per position, top-1."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dsnot_deploy.errors import UserInputError

# float64 elements per block of rows when comparing logits: bounds each temporary to 32 MiB
# (a few are alive at once), whatever the vocabulary.
_BLOCK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ChunkComparison:
    """Sums over one chunk's scored positions (float64)."""

    nll_dense: float
    nll_sparse: float
    kld: np.ndarray  # (scored,) per position
    top1_matches: int


def compare_logits(dense: np.ndarray, sparse: np.ndarray, targets: np.ndarray) -> ChunkComparison:
    """NLL of both models, per-position KL(dense || sparse) and top-1 matches over aligned rows.

    ``dense`` and ``sparse`` are ``(rows, vocab)`` logits, ``targets`` ``(rows,)`` the next tokens.
    Rows are processed in blocks in float64: with ``a = z - max(z)``, ``log Z = log sum exp(a)``,
    ``nll = log Z - a[y]`` and ``kld = sum p_d (a_d - a_s) - log Z_d + log Z_s``.
    """
    if dense.shape != sparse.shape or dense.ndim != 2 or targets.shape != (dense.shape[0],):
        raise UserInputError(f"expected aligned (rows, vocab) logits and (rows,) targets, found "
                             f"{dense.shape}, {sparse.shape}, {targets.shape}")
    rows, vocab = dense.shape
    block = max(1, _BLOCK_ELEMENTS // vocab)
    nll_d = nll_s = 0.0
    kld = np.empty(rows, dtype=np.float64)
    matches = 0
    for r in range(0, rows, block):
        zd = dense[r : r + block]  # (b, vocab) float32
        zs = sparse[r : r + block]
        y = targets[r : r + block]
        idx = np.arange(zd.shape[0])
        matches += int((zd.argmax(axis=1) == zs.argmax(axis=1)).sum())
        ad = zd.astype(np.float64)
        ad -= ad.max(axis=1, keepdims=True)
        as_ = zs.astype(np.float64)
        as_ -= as_.max(axis=1, keepdims=True)
        pd = np.exp(ad)  # unnormalised dense probabilities
        sum_d = pd.sum(axis=1)
        log_zd = np.log(sum_d)
        log_zs = np.log(np.exp(as_).sum(axis=1))
        nll_d += float((log_zd - ad[idx, y]).sum())
        nll_s += float((log_zs - as_[idx, y]).sum())
        ad -= as_  # a_d - a_s
        kld[r : r + block] = np.einsum("ij,ij->i", pd, ad) / sum_d - log_zd + log_zs
    np.maximum(kld, 0.0, out=kld)  # rounding can leave -1e-17 for identical rows
    return ChunkComparison(nll_dense=nll_d, nll_sparse=nll_s, kld=kld, top1_matches=matches)
