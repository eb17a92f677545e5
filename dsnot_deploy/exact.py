"""Exact-error prune-and-grow (algorithms.md section 4b), vectorised over rows.

The calibration output error of row i is E_i = dw_i^T H dw_i with dw = Wd - Ws and
H = (1/B) sum_b X_b^T X_b.  We keep G = dw @ H (rows, cols) up to date, so the exact change
of E_i for any single grow or prune is O(1) and a swap's update of G is O(cols) per row.
Only swaps with dE_i < -rel_tol * E_i(initial) are applied, so E_i never rises.
No weight value is ever changed: grown entries take their dense value, pruned ones 0.
"""

from __future__ import annotations

import torch

from .config import ExactConfig, SparsityPattern
from .dsnot import RefineResult
from .masks import check_shape


def row_errors(dense: torch.Tensor, sparse: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """E_i = dw_i^T H dw_i in float64, (rows,): the per-row calibration output error."""
    dw = dense.double() - sparse.double()
    return ((dw @ hessian.double()) * dw).sum(dim=1)


def exact_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    config: ExactConfig = ExactConfig(),
) -> RefineResult:
    """Refine `mask` of one Linear by exact-error swaps. dense/sparse/mask: (rows, cols)."""
    check_shape(dense.shape, pattern)
    Wd = dense.detach().float()
    Ws = sparse.detach().float().clone()
    mask = mask.clone()
    rows, cols = Wd.shape
    dev = Wd.device
    H = hessian.detach().float().to(dev)  # (cols, cols), symmetric
    hd = torch.diagonal(H)
    dw = Wd - Ws  # (rows, cols); non-zero at pruned (and at SparseGPT-updated kept) entries
    G = dw @ H  # (rows, cols)
    err0 = (G.double() * dw.double()).sum(dim=1)
    err = err0.clone()
    tol = config.rel_tol * err0.abs()
    # candidates: entries that never changed state yet (each entry flips at most once)
    can_grow = ~mask & (dw != 0)
    can_prune = mask & (Ws != 0)
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    running = err0 > 0
    inf = float("inf")
    k_top = min(config.top_k, cols)
    if pattern.is_nm:
        group_off = torch.arange(pattern.m, device=dev)

    for _ in range(config.max_swaps):
        idx = running.nonzero().squeeze(1)
        n_act = idx.numel()
        if n_act == 0:
            break
        everyone = n_act == rows
        dw_a = dw if everyone else dw[idx]  # (A, cols)
        ws_a = Ws if everyone else Ws[idx]
        g_a = G if everyone else G[idx]
        cg = can_grow if everyone else can_grow[idx]
        # dE of growing j alone: dw_j (dw_j H_jj - 2 g_j)
        grow_de = torch.addcmul(g_a, dw_a, hd, value=-0.5).mul_(-2.0).mul_(dw_a).masked_fill_(~cg, inf)
        grow_val, grow_j = torch.topk(grow_de, k_top, dim=1, largest=False)  # (A, K)
        del grow_de
        dwj = torch.gather(dw_a, 1, grow_j)
        if not pattern.is_nm:
            cp = can_prune if everyone else can_prune[idx]
            # dE of pruning k alone: w_k (w_k H_kk + 2 g_k)
            prune_de = torch.addcmul(g_a, ws_a, hd, value=0.5).mul_(2.0).mul_(ws_a).masked_fill_(~cp, inf)
            prune_val, prune_k = torch.topk(prune_de, k_top, dim=1, largest=False)  # (A, K)
            del prune_de
            cand_k = prune_k.unsqueeze(1).expand(-1, k_top, -1)  # (A, K, K)
            pv = prune_val.unsqueeze(1)
            wk = torch.gather(ws_a, 1, prune_k).unsqueeze(1)
        else:
            # partners: the other columns of each grown weight's own group of M
            cand_k = (grow_j // pattern.m * pattern.m).unsqueeze(2) + group_off  # (A, K, M)
            flat_k = cand_k.reshape(n_act, -1)
            cp = can_prune if everyone else can_prune[idx]
            ok_k = torch.gather(cp, 1, flat_k)
            wk = torch.gather(ws_a, 1, flat_k)
            gk = torch.gather(g_a, 1, flat_k)
            pv = torch.where(ok_k, wk * (wk * hd[flat_k] + 2 * gk), torch.full_like(wk, inf)).reshape(cand_k.shape)
            wk = wk.reshape(cand_k.shape)
        h_jk = H[grow_j.unsqueeze(2), cand_k]  # (A, K, K|M)
        pair = grow_val.unsqueeze(2) + pv - 2 * dwj.unsqueeze(2) * wk * h_jk
        best, flat = pair.reshape(n_act, -1).min(dim=1)
        accept = torch.isfinite(best) & (best.double() < -tol[idx])
        running[idx[~accept]] = False
        if not bool(accept.any()):
            break
        r = idx[accept]
        width = cand_k.shape[2]
        gi, ki = flat[accept] // width, flat[accept] % width
        ar = torch.arange(r.numel(), device=dev)
        j = grow_j[accept][ar, gi]
        k = cand_k[accept][ar, gi, ki]
        a = -dw[r, j]  # change of dw at j (grow)
        b = Ws[r, k]  # change of dw at k (prune)
        G[r] += a.unsqueeze(1) * H[j] + b.unsqueeze(1) * H[k]
        dw[r, j] = 0.0
        Ws[r, j] = Wd[r, j]
        dw[r, k] += b
        Ws[r, k] = 0.0
        mask[r, j] = True
        mask[r, k] = False
        can_grow[r, j] = False
        can_prune[r, k] = False
        err[r] += best[accept].double()
        swaps[r] += 1

    return RefineResult(Ws, mask, swaps, err0, err)
