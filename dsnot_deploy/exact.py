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


def _single_move_scores(dw: torch.Tensor, ws: torch.Tensor, g: torch.Tensor, hd: torch.Tensor,
                        can_grow: torch.Tensor, can_prune: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact dE of growing each entry alone and of pruning each entry alone (+inf if not allowed)."""
    inf = float("inf")
    # grow j: dw_j (dw_j H_jj - 2 g_j) ; prune k: w_k (w_k H_kk + 2 g_k)
    grow = torch.addcmul(g, dw, hd, value=-0.5).mul_(-2.0).mul_(dw).masked_fill_(~can_grow, inf)
    prune = torch.addcmul(g, ws, hd, value=0.5).mul_(2.0).mul_(ws).masked_fill_(~can_prune, inf)
    return grow, prune


def exact_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    config: ExactConfig = ExactConfig(),
) -> RefineResult:
    """Refine `mask` of one Linear by exact-error swaps. dense/sparse/mask: (rows, cols).

    Candidates come from a per-row pool of the `pool` best single moves of each side, rebuilt
    from the whole row every `refresh_every` swaps (and whenever a stale pool offers no improving
    swap); the K best of the pool by their *current* exact dE are paired.  Acceptance always uses
    the exact current dE of the pair, so staleness can only cost swaps, never raise the error.
    """
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
    pool = min(max(config.pool, config.top_k), cols)
    k_top = min(config.top_k, pool)
    pool_g = torch.zeros(rows, pool, dtype=torch.long, device=dev)
    pool_p = torch.zeros(rows, pool, dtype=torch.long, device=dev)
    age = torch.full((rows,), config.refresh_every, dtype=torch.long, device=dev)  # swaps since refresh
    if pattern.is_nm:
        group_off = torch.arange(pattern.m, device=dev)

    for _ in range(4 * config.max_swaps + 4):  # each row: <= max_swaps swaps + its refreshes
        running &= swaps < config.max_swaps
        idx = running.nonzero().squeeze(1)
        n_act = idx.numel()
        if n_act == 0:
            break
        stale = age[idx] >= config.refresh_every
        if bool(stale.any()):
            r = idx[stale]
            grow_de, prune_de = _single_move_scores(dw[r], Ws[r], G[r], hd, can_grow[r], can_prune[r])
            pool_g[r] = torch.topk(grow_de, pool, dim=1, largest=False).indices
            if not pattern.is_nm:
                pool_p[r] = torch.topk(prune_de, pool, dim=1, largest=False).indices
            age[r] = 0
            del grow_de, prune_de
        fresh = age[idx] == 0
        # current exact single-move dE of the pooled candidates
        pg = pool_g[idx]
        dwg = torch.gather(dw[idx], 1, pg)
        gg = torch.gather(G[idx], 1, pg)
        gval = torch.where(torch.gather(can_grow[idx], 1, pg), dwg * (dwg * hd[pg] - 2 * gg), torch.full_like(gg, inf))
        grow_val, sel = torch.topk(gval, k_top, dim=1, largest=False)  # (A, K)
        grow_j = torch.gather(pg, 1, sel)
        dwj = torch.gather(dwg, 1, sel)
        if not pattern.is_nm:
            pp = pool_p[idx]
            wsp = torch.gather(Ws[idx], 1, pp)
            gp = torch.gather(G[idx], 1, pp)
            pval = torch.where(torch.gather(can_prune[idx], 1, pp), wsp * (wsp * hd[pp] + 2 * gp),
                               torch.full_like(gp, inf))
            prune_val, psel = torch.topk(pval, k_top, dim=1, largest=False)  # (A, K)
            prune_k = torch.gather(pp, 1, psel)
            cand_k = prune_k.unsqueeze(1).expand(-1, k_top, -1)  # (A, K, K)
            pv = prune_val.unsqueeze(1)
            wk = torch.gather(wsp, 1, psel).unsqueeze(1)
        else:
            # partners: the other columns of each grown weight's own group of M
            cand_k = (grow_j // pattern.m * pattern.m).unsqueeze(2) + group_off  # (A, K, M)
            flat_k = cand_k.reshape(n_act, -1)
            ok_k = torch.gather(can_prune[idx], 1, flat_k)
            wk = torch.gather(Ws[idx], 1, flat_k)
            gk = torch.gather(G[idx], 1, flat_k)
            pv = torch.where(ok_k, wk * (wk * hd[flat_k] + 2 * gk), torch.full_like(wk, inf)).reshape(cand_k.shape)
            wk = wk.reshape(cand_k.shape)
        h_jk = H[grow_j.unsqueeze(2), cand_k]  # (A, K, K|M)
        pair = grow_val.unsqueeze(2) + pv - 2 * dwj.unsqueeze(2) * wk * h_jk
        best, flat = pair.reshape(n_act, -1).min(dim=1)
        accept = torch.isfinite(best) & (best.double() < -tol[idx])
        # no improving swap: a fresh pool means none exists among the best candidates -> stop;
        # a stale pool is rebuilt on the next cycle
        running[idx[~accept & fresh]] = False
        age[idx[~accept & ~fresh]] = config.refresh_every
        if not bool(accept.any()):
            continue
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
        age[r] += 1

    return RefineResult(Ws, mask, swaps, err0, err)
