"""Exact-error prune-and-grow (algorithms.md section 4b), vectorised over rows.

The calibration output error of row i is E_i = dw_i^T H dw_i with dw = Wd - Ws and
H = (1/B) sum_b X_b^T X_b.  We keep G = dw @ H (rows, cols) up to date, so the exact change
of E_i for any single grow or prune is O(1) and a swap's update of G is O(cols) per row.
Only swaps with dE_i < -rel_tol * E_i(initial) are applied, so E_i never rises.
No weight value is ever changed: grown entries take their dense value, pruned ones 0.
"""

from __future__ import annotations

import torch

from dsnot_deploy.algorithms.config import ExactConfig, SparsityPattern
from dsnot_deploy.algorithms.dsnot import RefineResult
from dsnot_deploy.algorithms.masks import working_copies


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


def _group_blocks(H: torch.Tensor, m: int) -> torch.Tensor:
    """The diagonal M x M blocks of H, (cols/M, M, M): H inside each group of M columns."""
    g = H.shape[0] // m
    return H.reshape(g, m, g, m).diagonal(dim1=0, dim2=2).permute(2, 0, 1).contiguous()


def _group_pairs(dw: torch.Tensor, ws: torch.Tensor, g: torch.Tensor, hd: torch.Tensor,
                 can_grow: torch.Tensor, can_prune: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Exact dE of every (grow j, prune k) pair inside each group: (..., groups, M, M).

    All arguments but `blocks` are (..., groups, M); `blocks` is (..., groups, M, M) or broadcastable.
    """
    inf = float("inf")
    grow = torch.addcmul(g, dw, hd, value=-0.5).mul_(-2.0).mul_(dw).masked_fill_(~can_grow, inf)
    prune = torch.addcmul(g, ws, hd, value=0.5).mul_(2.0).mul_(ws).masked_fill_(~can_prune, inf)
    cross = (dw.unsqueeze(-1) * ws.unsqueeze(-2)).mul_(blocks).mul_(-2.0)
    return cross.add_(grow.unsqueeze(-1)).add_(prune.unsqueeze(-2))


def exact_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    mask: torch.Tensor,
    hessian: torch.Tensor,
    pattern: SparsityPattern,
    config: ExactConfig = ExactConfig(),
) -> RefineResult:
    """Refine `mask` of one Linear by exact-error swaps. dense/sparse/mask: (rows, cols).

    Unstructured: each row keeps a pool of the `pool` best single moves of each side, rebuilt from
    the whole row every `refresh_every` swaps (and whenever a stale pool offers no improving swap);
    each swap pairs the K best of each pool by their *current* exact dE (K x K pairs, cross term
    included).  N:M: a swap stays inside one group, so every pair of a group is evaluated exactly;
    the pool holds the `pool` groups with the best pair, rebuilt the same way.  Acceptance always
    uses the exact current dE of the pair, so a stale pool can only cost swaps, never raise E.
    """
    Wd, Ws, mask = working_copies(dense, sparse, mask, pattern)
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
    nm = pattern.is_nm
    if nm:
        m = pattern.m
        n_groups = cols // m
        blocks = _group_blocks(H, m)  # (groups, M, M)
        hd_g = hd.reshape(n_groups, m)
        group_off = torch.arange(m, device=dev)
        pool = min(config.pool, n_groups)
    else:
        pool = min(max(config.pool, config.top_k), cols)
        k_top = min(config.top_k, pool)
        pool_p = torch.zeros(rows, pool, dtype=torch.long, device=dev)
    pool_g = torch.zeros(rows, pool, dtype=torch.long, device=dev)  # columns, or groups for N:M
    age = torch.full((rows,), config.refresh_every, dtype=torch.long, device=dev)  # swaps since refresh
    chunk = max(1, (1 << 24) // (cols * (m if nm else 1)))  # rows per refresh step: bounded memory

    for _ in range(4 * config.max_swaps + 4):  # each row: <= max_swaps swaps + its refreshes
        running &= swaps < config.max_swaps
        idx = running.nonzero().squeeze(1)
        n_act = idx.numel()
        if n_act == 0:
            break
        stale_rows = idx[age[idx] >= config.refresh_every]
        for c0 in range(0, stale_rows.numel(), chunk):
            r = stale_rows[c0 : c0 + chunk]
            if nm:
                shape = (r.numel(), n_groups, m)
                pairs = _group_pairs(dw[r].view(shape), Ws[r].view(shape), G[r].view(shape), hd_g,
                                     can_grow[r].view(shape), can_prune[r].view(shape), blocks)
                best_group = pairs.flatten(2).amin(dim=2)  # (R', groups)
                pool_g[r] = torch.topk(best_group, pool, dim=1, largest=False).indices
            else:
                grow_de, prune_de = _single_move_scores(dw[r], Ws[r], G[r], hd, can_grow[r], can_prune[r])
                pool_g[r] = torch.topk(grow_de, pool, dim=1, largest=False).indices
                pool_p[r] = torch.topk(prune_de, pool, dim=1, largest=False).indices
            age[r] = 0
        fresh = age[idx] == 0
        if nm:
            pgroups = pool_g[idx]  # (A, P)
            gcols = (pgroups.unsqueeze(2) * m + group_off).reshape(n_act, -1)  # (A, P*M)
            shape = (n_act, pool, m)
            rix = idx.unsqueeze(1)

            def take(t: torch.Tensor) -> torch.Tensor:
                return t[rix, gcols].view(shape)

            pairs = _group_pairs(take(dw), take(Ws), take(G), hd[gcols].view(shape), take(can_grow),
                                 take(can_prune), blocks[pgroups])  # (A, P, M, M)
            best, flat = pairs.reshape(n_act, -1).min(dim=1)
            gi = flat // (m * m)
            grp = torch.gather(pgroups, 1, gi.unsqueeze(1)).squeeze(1)
            j_all = grp * m + (flat // m) % m
            k_all = grp * m + flat % m
        else:
            # current exact single-move dE of the pooled candidates
            pg, pp = pool_g[idx], pool_p[idx]
            rix = idx.unsqueeze(1)
            dwg = dw[rix, pg]
            gg = G[rix, pg]
            gval = torch.where(can_grow[rix, pg], dwg * (dwg * hd[pg] - 2 * gg), torch.full_like(gg, inf))
            grow_val, sel = torch.topk(gval, k_top, dim=1, largest=False)  # (A, K)
            grow_j = torch.gather(pg, 1, sel)
            dwj = torch.gather(dwg, 1, sel)
            wsp = Ws[rix, pp]
            gp = G[rix, pp]
            pval = torch.where(can_prune[rix, pp], wsp * (wsp * hd[pp] + 2 * gp), torch.full_like(gp, inf))
            prune_val, psel = torch.topk(pval, k_top, dim=1, largest=False)  # (A, K)
            prune_k = torch.gather(pp, 1, psel)
            wk = torch.gather(wsp, 1, psel)
            h_jk = H[grow_j.unsqueeze(2), prune_k.unsqueeze(1)]  # (A, K, K)
            pair = grow_val.unsqueeze(2) + prune_val.unsqueeze(1) - 2 * dwj.unsqueeze(2) * wk.unsqueeze(1) * h_jk
            best, flat = pair.reshape(n_act, -1).min(dim=1)
            j_all = torch.gather(grow_j, 1, (flat // k_top).unsqueeze(1)).squeeze(1)
            k_all = torch.gather(prune_k, 1, (flat % k_top).unsqueeze(1)).squeeze(1)
        accept = torch.isfinite(best) & (best.double() < -tol[idx])
        # no improving swap: a fresh pool means none exists among the best candidates -> stop;
        # a stale pool is rebuilt on the next cycle
        running[idx[~accept & fresh]] = False
        age[idx[~accept & ~fresh]] = config.refresh_every
        if not bool(accept.any()):
            continue
        r, j, k = idx[accept], j_all[accept], k_all[accept]
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
