"""Faithful DSnoT prune-and-grow (algorithms.md section 4), vectorised over rows.

Never changes a weight value: a grown entry takes its dense value, a pruned one becomes 0.
The sparsity is never changed: a row stops when it lacks a candidate of the needed sign
(the reference would walk into the wrong partition there).

Decisions where the description leaves room (documented in docs/decisions.md):
- the prune side's direction follows the error *after* the grow of the same cycle;
- the prune side's contributions use the current value Ws (what pruning really removes;
  equal to the dense value except after SparseGPT's update);
- a swap that would break the sign condition is not applied, and the row stops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_deploy.algorithms.config import DSnoTConfig, SparsityPattern
from dsnot_deploy.algorithms.masks import wanda_scores, working_copies


@dataclass(frozen=True)
class RefineResult:
    """Output of a mask refinement of one Linear."""

    weight: torch.Tensor  # (rows, cols) float32, zeros where pruned
    mask: torch.Tensor  # (rows, cols) bool, True = kept
    swaps: torch.Tensor  # (rows,) int64, grow+prune pairs applied per row
    objective_before: torch.Tensor  # (rows,) float64, the refinement's own objective per row
    objective_after: torch.Tensor  # (rows,) float64


def mean_error(dense: torch.Tensor, sparse: torch.Tensor, tokensum: torch.Tensor) -> torch.Tensor:
    """e_i = sum_j (Wd_ij - Ws_ij) * tokensum_j, float64, (rows,)."""
    return ((dense.double() - sparse.double()) * tokensum.double().unsqueeze(0)).sum(dim=1)


def _two_section_order(section: torch.Tensor, within: torch.Tensor) -> torch.Tensor:
    """Column order per row: by `section` (0, 1, 2), ties by `within` ascending (both stable)."""
    by_within = torch.sort(within, dim=1, stable=True).indices
    sec_sorted = torch.gather(section, 1, by_within)
    return torch.gather(by_within, 1, torch.sort(sec_sorted, dim=1, stable=True).indices)


def dsnot_refine(
    dense: torch.Tensor,
    sparse: torch.Tensor,
    mask: torch.Tensor,
    tokensum: torch.Tensor,
    variance: torch.Tensor,
    sqnorm: torch.Tensor,
    pattern: SparsityPattern,
    config: DSnoTConfig = DSnoTConfig(),
) -> RefineResult:
    """Refine `mask` of one Linear. `dense`/`sparse`: (rows, cols); statistics: (cols,)."""
    Wd, Ws, mask = working_copies(dense, sparse, mask, pattern)
    rows, cols = Wd.shape
    dev = Wd.device
    t = tokensum.float().to(dev)
    ar = torch.arange(rows, device=dev)

    # Grow order: key = c / var^p on pruned entries, 0 on kept ones; ascending.
    c_grow = Wd * t.unsqueeze(0)
    denom = variance.float().to(dev).pow(config.pow_of_var_regrowing) if config.pow_of_var_regrowing else 1.0
    key = torch.where(mask, torch.zeros_like(c_grow), c_grow / denom)
    grow_order = torch.sort(key, dim=1, stable=True).indices  # (rows, cols)
    n_gneg = (key < 0).sum(dim=1)
    n_gpos = (key > 0).sum(dim=1)
    g_lo = torch.zeros(rows, dtype=torch.long, device=dev)  # next most negative key
    g_hi = torch.full((rows,), cols - 1, dtype=torch.long, device=dev)  # next largest positive key

    score = wanda_scores(Ws, sqnorm.to(dev))  # initial Wanda score of the current weights
    if not pattern.is_nm:
        # Prune order: kept c<0 by ascending score | everything else | kept c>0 by descending score.
        c_prune = Ws * t.unsqueeze(0)
        section = torch.ones_like(mask, dtype=torch.long)
        section[mask & (c_prune < 0)] = 0
        section[mask & (c_prune > 0)] = 2
        within = torch.where(section == 0, score, torch.where(section == 2, -score, torch.zeros_like(score)))
        prune_order = _two_section_order(section, within)
        n_pneg = (section == 0).sum(dim=1)
        n_ppos = (section == 2).sum(dim=1)
        p_lo = torch.zeros(rows, dtype=torch.long, device=dev)
        p_hi = torch.full((rows,), cols - 1, dtype=torch.long, device=dev)
    else:
        avail_score = torch.where(mask, score, torch.full_like(score, float("inf")))  # (rows, cols)
        group_cols = torch.arange(pattern.m, device=dev)

    same_sign = config.same_sign if config.same_sign is not None else pattern.is_nm
    e = mean_error(Wd, Ws, t)
    e0 = e.clone()
    sign0 = torch.sign(e0)
    swaps = torch.zeros(rows, dtype=torch.long, device=dev)
    running = torch.ones(rows, dtype=torch.bool, device=dev)

    for _ in range(config.max_cycle_time):
        running &= e.abs() > config.update_threshold
        idx = running.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        e_a = e[idx]
        pos = e_a > 0
        # --- grow: largest positive key when e > 0, most negative otherwise
        g_ptr = torch.where(pos, g_hi[idx], g_lo[idx])
        g_ok = torch.where(pos, g_hi[idx] >= cols - n_gpos[idx], g_lo[idx] < n_gneg[idx])
        j = grow_order[idx, g_ptr.clamp(0, cols - 1)]
        e_g = e_a - (Wd[idx, j] * t[j]).double()
        # --- prune
        if not pattern.is_nm:
            take_pos = e_g < 0  # prune a positive contribution to raise a negative error
            p_ptr = torch.where(take_pos, p_hi[idx], p_lo[idx])
            p_ok = torch.where(take_pos, p_hi[idx] >= cols - n_ppos[idx], p_lo[idx] < n_pneg[idx])
            k = prune_order[idx, p_ptr.clamp(0, cols - 1)]
        else:
            start = (j // pattern.m) * pattern.m
            gcols = start.unsqueeze(1) + group_cols  # (active, m)
            gscores = avail_score[idx.unsqueeze(1), gcols]
            best, arg = gscores.min(dim=1)
            p_ok = torch.isfinite(best)
            k = gcols[ar[: idx.numel()], arg]
        e_new = e_g + (Ws[idx, k] * t[k]).double()
        ok = g_ok & p_ok
        if same_sign:
            ok &= torch.sign(e_new) == sign0[idx]
        # Rows lacking a candidate, or failing the sign condition, stop here; an N:M grow
        # candidate whose group has no partner left is consumed and the row goes on.
        if pattern.is_nm:
            consumed = g_ok & ~p_ok
            stop = ~g_ok | (p_ok & ~ok)
        else:
            consumed = torch.zeros_like(ok)
            stop = ~ok
        running[idx[stop]] = False
        adv = ok | consumed
        g_hi[idx[adv & pos]] -= 1
        g_lo[idx[adv & ~pos]] += 1
        r, jj, kk = idx[ok], j[ok], k[ok]
        if not pattern.is_nm:
            tp = take_pos[ok]
            p_hi[r[tp]] -= 1
            p_lo[r[~tp]] += 1
        else:
            avail_score[r, kk] = float("inf")
        mask[r, jj] = True
        Ws[r, jj] = Wd[r, jj]
        mask[r, kk] = False
        Ws[r, kk] = 0.0
        e[r] = e_new[ok]
        swaps[r] += 1

    return RefineResult(Ws, mask, swaps, e0.abs(), e.abs())
