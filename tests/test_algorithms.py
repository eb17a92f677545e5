"""Invariants of algorithms.md sections 2-4b on small random matrices (seconds)."""

from __future__ import annotations

import math

import pytest
import torch

from dsnot_deploy.algorithms.config import (
    DSnoTConfig,
    ExactConfig,
    MagnitudeScope,
    SparsityPattern,
    VarianceKind,
)
from dsnot_deploy.algorithms.dsnot import dsnot_refine, mean_error
from dsnot_deploy.algorithms.exact import exact_refine, row_errors
from dsnot_deploy.algorithms.masks import magnitude_mask, wanda_mask, wanda_scores
from dsnot_deploy.algorithms.sparsegpt import sparsegpt_prune
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.errors import UserInputError

UNSTRUCTURED = [SparsityPattern.unstructured(s) for s in (0.3, 0.5, 0.7)]
NM = [SparsityPattern.nm(2, 4), SparsityPattern.nm(4, 8), SparsityPattern.nm(1, 4)]


def correlated_inputs(seed: int, b: int = 6, length: int = 96, cols: int = 64, shift: float = 0.4) -> torch.Tensor:
    """(b, L, cols) activations with correlated channels and non-zero means (as in LLMs)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols)
    scale = torch.rand(cols, generator=g) * 2 + 0.1
    return (torch.randn(b, length, cols, generator=g) @ mix) * scale + shift * torch.randn(cols, generator=g)


def setup(seed: int = 0, rows: int = 24, cols: int = 64) -> tuple[torch.Tensor, ChannelStats, torch.Tensor]:
    x = correlated_inputs(seed, cols=cols)
    stats = ChannelStats(cols, with_hessian=True)
    for sample in x:
        accumulate(stats, sample)
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed + 100))
    return w, stats, x


# ---------------------------------------------------------------- statistics (section 2)


def test_statistics_match_direct_formulas() -> None:
    x = correlated_inputs(1)
    stats = ChannelStats(x.shape[-1], with_hessian=True)
    accumulate(stats, x[:2])  # batched and single updates mix
    for sample in x[2:]:
        accumulate(stats, sample)
    b = x.shape[0]
    x64 = x.double()
    torch.testing.assert_close(stats.sqnorm.double(), x64.pow(2).sum(dim=(0, 1)) / b, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(stats.tokensum.double(), x64.sum(dim=(0, 1)) / b, rtol=1e-5, atol=1e-4)
    within = x64.var(dim=1, unbiased=False).mean(dim=0)
    pooled = x64.reshape(-1, x.shape[-1]).var(dim=0, unbiased=False)
    torch.testing.assert_close(stats.variance(VarianceKind.WITHIN_SAMPLE).double(), within, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.variance(VarianceKind.POOLED).double(), pooled, rtol=1e-5, atol=1e-6)
    # pooled >= within: it also sees the spread of per-sample means
    assert bool((stats.variance(VarianceKind.POOLED) >= stats.variance(VarianceKind.WITHIN_SAMPLE) - 1e-5).all())
    hess = sum(s.T @ s for s in x64) / b
    torch.testing.assert_close(stats.hessian.double(), hess, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(torch.diagonal(stats.hessian), stats.sqnorm)


def test_pooled_variance_is_stable_with_large_means() -> None:
    x = torch.randn(4, 512, 8) * 0.01 + 1000.0  # naive E[x^2]-E[x]^2 in float32 would be garbage
    stats = ChannelStats(8, with_hessian=False)
    for sample in x:
        accumulate(stats, sample)
    want = x.double().reshape(-1, 8).var(dim=0, unbiased=False)
    torch.testing.assert_close(stats.variance(VarianceKind.POOLED).double(), want, rtol=2e-2, atol=1e-7)


def test_dead_channel_variance_is_guarded() -> None:
    x = torch.randn(2, 16, 4)
    x[..., 2] = 0.0
    stats = accumulate(ChannelStats(4, with_hessian=False), x)
    assert float(stats.variance(VarianceKind.POOLED)[2]) > 0
    assert float(stats.variance(VarianceKind.WITHIN_SAMPLE)[2]) > 0


# ---------------------------------------------------------------- initial masks (section 3)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.6, 0.93])
def test_wanda_matches_brute_force_ranking(sparsity: float) -> None:
    w, stats, _ = setup(2)
    pattern = SparsityPattern.unstructured(sparsity)
    mask = wanda_mask(w, stats.sqnorm, pattern)
    scores = wanda_scores(w, stats.sqnorm)
    n_prune = int(w.shape[1] * sparsity)
    for i in range(w.shape[0]):
        row = scores[i].tolist()
        ranked = sorted(range(len(row)), key=lambda j: (row[j], j))
        assert {j for j in range(len(row)) if not mask[i, j]} == set(ranked[:n_prune])


@pytest.mark.parametrize("pattern", NM, ids=lambda p: p.describe())
def test_nm_masks_prune_n_lowest_per_group(pattern: SparsityPattern) -> None:
    w, stats, _ = setup(3)
    mask = wanda_mask(w, stats.sqnorm, pattern)
    scores = wanda_scores(w, stats.sqnorm)
    groups_mask = mask.reshape(w.shape[0], -1, pattern.m)
    assert bool(((~groups_mask).sum(dim=2) == pattern.n).all())
    groups = scores.reshape(w.shape[0], -1, pattern.m)
    pruned_max = torch.where(~groups_mask, groups, torch.full_like(groups, -1)).amax(dim=2)
    kept_min = torch.where(groups_mask, groups, torch.full_like(groups, float("inf"))).amin(dim=2)
    assert bool((pruned_max <= kept_min).all())


def test_magnitude_scopes() -> None:
    w, _, _ = setup(4)
    pattern = SparsityPattern.unstructured(0.6)
    per_row = magnitude_mask(w, pattern, MagnitudeScope.PER_ROW)
    assert bool(((~per_row).sum(dim=1) == int(w.shape[1] * 0.6)).all())
    per_matrix = magnitude_mask(w, pattern, MagnitudeScope.PER_MATRIX)
    assert int((~per_matrix).sum()) == int(w.numel() * 0.6)
    assert float(w.abs()[~per_matrix].max()) <= float(w.abs()[per_matrix].min())


def test_bad_patterns_are_rejected() -> None:
    for bad in (0.0, 1.0, -0.2, 1.5, float("nan")):
        with pytest.raises(UserInputError):
            SparsityPattern.unstructured(bad)
    for text in ("4:4", "5:4", "0:4", "2:0", "a:b", "x"):
        with pytest.raises(UserInputError):
            SparsityPattern.parse(text)
    with pytest.raises(UserInputError, match="divisible by 4"):
        wanda_mask(torch.randn(4, 10), torch.ones(10), SparsityPattern.nm(2, 4))


@pytest.mark.parametrize("pattern", [SparsityPattern.unstructured(0.5), SparsityPattern.nm(2, 4)],
                         ids=lambda p: p.describe())
def test_sparsegpt_beats_magnitude_on_correlated_inputs(pattern: SparsityPattern) -> None:
    w, stats, _ = setup(5, rows=32, cols=64)
    hess = stats.hessian
    updated, mask = sparsegpt_prune(w, hess, pattern)
    assert bool((updated[~mask] == 0).all())
    if pattern.is_nm:
        assert bool(((~mask).reshape(32, -1, 4).sum(dim=2) == 2).all())
    else:
        assert int((~mask).sum()) == int(w.numel() * 0.5)
    magnitude = w * magnitude_mask(w, pattern)
    wanda = w * wanda_mask(w, stats.sqnorm, pattern)
    err_sgpt = row_errors(w, updated, hess).sum()
    assert err_sgpt < row_errors(w, magnitude, hess).sum()
    assert err_sgpt < row_errors(w, wanda, hess).sum()


def test_sparsegpt_dead_columns() -> None:
    w, stats, _ = setup(6)
    hess = stats.hessian.clone()
    hess[:, 3] = 0
    hess[3, :] = 0
    updated, _ = sparsegpt_prune(w, hess, SparsityPattern.unstructured(0.5))
    assert bool((updated[:, 3] == 0).all())


# ---------------------------------------------------------------- DSnoT (section 4)


def reference_dsnot(wd, ws, mask, tokensum, var, sqnorm, pattern, cfg):
    """Slow, obviously-correct per-row loop written from algorithms.md section 4."""
    rows, cols = wd.shape
    t = tokensum.tolist()
    score = wanda_scores(ws, sqnorm)
    key_t = torch.where(mask, torch.zeros_like(wd), (wd * tokensum) / (var.pow(cfg.pow_of_var_regrowing)
                        if cfg.pow_of_var_regrowing else 1.0))
    same_sign = cfg.same_sign if cfg.same_sign is not None else pattern.is_nm
    out_w, out_m = ws.clone(), mask.clone()
    swaps = []
    for i in range(rows):
        w_d, w_s, m = wd[i].tolist(), ws[i].tolist(), mask[i].tolist()
        key, sc = key_t[i].tolist(), score[i].tolist()
        grow = sorted(range(cols), key=lambda j: key[j])  # ascending, stable
        negs = [j for j in grow if key[j] < 0]  # walk from the start
        poss = [j for j in reversed(grow) if key[j] > 0]  # walk from the end
        c_prune = [w_s[j] * t[j] for j in range(cols)]
        kept_neg = sorted([j for j in range(cols) if m[j] and c_prune[j] < 0], key=lambda j: sc[j])
        kept_pos = sorted([j for j in range(cols) if m[j] and c_prune[j] > 0], key=lambda j: -sc[j])
        prune_neg = kept_neg  # from the start
        prune_pos = list(reversed(kept_pos))  # from the end of the list
        init_score = [sc[j] if m[j] else math.inf for j in range(cols)]
        e = sum((w_d[j] - w_s[j]) * t[j] for j in range(cols))
        sign0 = math.copysign(1, e) if e else 0
        n = 0
        for _ in range(cfg.max_cycle_time):
            if abs(e) <= cfg.update_threshold:
                break
            source = poss if e > 0 else negs
            if not source:
                break
            j = source[0]
            e_g = e - w_d[j] * t[j]
            if pattern.is_nm:
                start = j // pattern.m * pattern.m
                cands = [(init_score[k], k) for k in range(start, start + pattern.m)]
                best = min(cands)
                if best[0] == math.inf:
                    source.pop(0)
                    continue
                k = best[1]
            else:
                target = prune_pos if e_g < 0 else prune_neg
                if not target:
                    break
                k = target[0]
            e_new = e_g + w_s[k] * t[k]
            if same_sign and (math.copysign(1, e_new) if e_new else 0) != sign0:
                break
            source.pop(0)
            if pattern.is_nm:
                init_score[k] = math.inf
            else:
                target.pop(0)
            m[j], w_s[j] = True, w_d[j]
            m[k], w_s[k] = False, 0.0
            e = e_new
            n += 1
        out_w[i] = torch.tensor(w_s)
        out_m[i] = torch.tensor(m)
        swaps.append(n)
    return out_w, out_m, swaps


def _dsnot_inputs(seed: int, pattern: SparsityPattern):
    w, stats, _ = setup(seed)
    mask = wanda_mask(w, stats.sqnorm, pattern)
    return w, w * mask, mask, stats


CASES = [
    (SparsityPattern.unstructured(0.5), DSnoTConfig()),
    (SparsityPattern.unstructured(0.7), DSnoTConfig(max_cycle_time=7, same_sign=True)),
    (SparsityPattern.unstructured(0.6), DSnoTConfig(pow_of_var_regrowing=0.0, update_threshold=0.0)),
    (SparsityPattern.unstructured(0.6), DSnoTConfig(variance=VarianceKind.POOLED, pow_of_var_regrowing=2)),
    (SparsityPattern.nm(2, 4), DSnoTConfig()),
    (SparsityPattern.nm(4, 8), DSnoTConfig(update_threshold=0.0, max_cycle_time=200)),
]


@pytest.mark.parametrize("pattern,cfg", CASES, ids=lambda v: getattr(v, "describe", lambda: "")())
def test_vectorised_dsnot_equals_reference_loop(pattern: SparsityPattern, cfg: DSnoTConfig) -> None:
    for seed in (0, 1):
        wd, ws, mask, stats = _dsnot_inputs(seed, pattern)
        var = stats.variance(cfg.variance)
        got = dsnot_refine(wd, ws, mask, stats.tokensum, var, stats.sqnorm, pattern, cfg)
        want_w, want_m, want_swaps = reference_dsnot(wd, ws, mask, stats.tokensum, var, stats.sqnorm, pattern, cfg)
        assert got.swaps.tolist() == want_swaps
        assert torch.equal(got.mask, want_m)
        assert torch.equal(got.weight, want_w)
        assert sum(want_swaps) > 0  # the case exercises swaps at all


@pytest.mark.parametrize("pattern,cfg", CASES, ids=lambda v: getattr(v, "describe", lambda: "")())
def test_dsnot_invariants(pattern: SparsityPattern, cfg: DSnoTConfig) -> None:
    wd, ws, mask, stats = _dsnot_inputs(7, pattern)
    res = dsnot_refine(wd, ws, mask, stats.tokensum, stats.variance(cfg.variance), stats.sqnorm, pattern, cfg)
    # per-row (and per-group) zero counts unchanged
    assert torch.equal((~res.mask).sum(dim=1), (~mask).sum(dim=1))
    assert torch.equal((res.weight == 0).sum(dim=1), (ws == 0).sum(dim=1))
    if pattern.is_nm:
        groups = (~res.mask).reshape(wd.shape[0], -1, pattern.m).sum(dim=2)
        assert bool((groups == pattern.n).all())
    # each entry changes state at most once: a swap flips two entries, none is flipped back
    changed = (res.mask != mask).sum(dim=1)
    assert torch.equal(changed, 2 * res.swaps)
    # values never change: kept entries hold the dense value, pruned ones 0
    assert torch.equal(res.weight, torch.where(res.mask, wd, torch.zeros_like(wd)))
    # swap cap and incremental error equal to a full recomputation
    assert int(res.swaps.max()) <= cfg.max_cycle_time
    torch.testing.assert_close(res.objective_after, mean_error(wd, res.weight, stats.tokensum).abs(),
                               rtol=1e-6, atol=1e-4)


def test_dsnot_hand_checked_cycles() -> None:
    """One row worked by hand from algorithms.md section 4 (tokensum = var = sqnorm = 1).

    Wd = [-1, -2, 3, .5, -.25, 4], kept {0, 2, 5}: e = -2 + .5 - .25 = -1.75.
    Cycle 1: e < 0 -> grow the most negative key (col 1): e = .25 >= 0 -> prune from the negative
    end (col 0, the only kept c < 0): e = -.75.  Cycle 2: grow col 4: e = -.5 < 0 -> prune the
    lowest-score positive (col 2): e = 2.5.  Cycle 3: grow col 3 would need a negative prune
    partner; none is left, so the row stops (it never walks into the wrong side).
    """
    wd = torch.tensor([[-1.0, -2.0, 3.0, 0.5, -0.25, 4.0]])
    mask = torch.tensor([[True, False, True, False, False, True]])
    ones = torch.ones(6)
    res = dsnot_refine(wd, wd * mask, mask, ones, ones, ones, SparsityPattern.unstructured(0.5),
                       DSnoTConfig(update_threshold=0.1))
    assert res.mask.tolist() == [[False, True, False, False, True, True]]
    assert res.swaps.tolist() == [2]
    assert res.objective_before.tolist() == [1.75]
    assert res.objective_after.tolist() == [2.5]  # DSnoT's greedy walk can end further from 0
    one = dsnot_refine(wd, wd * mask, mask, ones, ones, ones, SparsityPattern.unstructured(0.5),
                       DSnoTConfig(max_cycle_time=1))
    assert one.mask.tolist() == [[False, True, True, False, False, True]] and one.objective_after.tolist() == [0.75]
    signed = dsnot_refine(wd, wd * mask, mask, ones, ones, ones, SparsityPattern.unstructured(0.5),
                          DSnoTConfig(same_sign=True))
    assert signed.swaps.tolist() == [1] and signed.objective_after.tolist() == [0.75]  # cycle 2 flips the sign


def test_dsnot_never_changes_sparsity_when_candidates_run_out() -> None:
    # every pruned weight contributes with the same sign, so the needed grow side soon runs dry
    rows, cols = 8, 16
    wd = torch.rand(rows, cols) + 0.1
    tokensum = torch.ones(cols)
    mask = wanda_mask(wd, torch.ones(cols), SparsityPattern.unstructured(0.5))
    res = dsnot_refine(wd, wd * mask, mask, tokensum, torch.ones(cols), torch.ones(cols),
                       SparsityPattern.unstructured(0.5), DSnoTConfig(update_threshold=0.0))
    assert torch.equal((~res.mask).sum(dim=1), (~mask).sum(dim=1))


def test_dsnot_on_sparsegpt_init_uses_current_values() -> None:
    w, stats, _ = setup(9)
    pattern = SparsityPattern.unstructured(0.5)
    updated, mask = sparsegpt_prune(w, stats.hessian, pattern)
    res = dsnot_refine(w, updated, mask, stats.tokensum, stats.variance(VarianceKind.WITHIN_SAMPLE),
                       stats.sqnorm, pattern)
    untouched = res.mask & mask
    assert torch.equal(res.weight[untouched], updated[untouched])  # updated values kept
    grown = res.mask & ~mask
    assert torch.equal(res.weight[grown], w[grown])  # grown entries take the dense value
    torch.testing.assert_close(res.objective_after, mean_error(w, res.weight, stats.tokensum).abs(),
                               rtol=1e-6, atol=1e-4)


# ---------------------------------------------------------------- exact variant (section 4b)


@pytest.mark.parametrize("pattern", UNSTRUCTURED + NM, ids=lambda p: p.describe())
@pytest.mark.parametrize("init", ["wanda", "sparsegpt"])
@pytest.mark.parametrize("refresh", [1, 4])
def test_exact_never_raises_row_error_and_keeps_pattern(pattern: SparsityPattern, init: str, refresh: int) -> None:
    w, stats, _ = setup(10)
    hess = stats.hessian
    if init == "wanda":
        mask = wanda_mask(w, stats.sqnorm, pattern)
        start = w * mask
    else:
        start, mask = sparsegpt_prune(w, hess, pattern)
    cfg = ExactConfig(max_swaps=20, top_k=4, pool=8, refresh_every=refresh)
    res = exact_refine(w, start, mask, hess, pattern, cfg)
    before, after = row_errors(w, start, hess), row_errors(w, res.weight, hess)
    assert bool((after <= before * (1 + 1e-6) + 1e-9).all())  # never rises, row by row
    assert float(after.sum()) < float(before.sum())  # and helps overall
    torch.testing.assert_close(res.objective_after, after, rtol=1e-4, atol=1e-4)  # incremental == recomputed
    assert torch.equal((~res.mask).sum(dim=1), (~mask).sum(dim=1))
    if pattern.is_nm:
        assert bool(((~res.mask).reshape(w.shape[0], -1, pattern.m).sum(dim=2) == pattern.n).all())
    assert torch.equal((res.mask != mask).sum(dim=1), 2 * res.swaps)
    assert int(res.swaps.max()) <= cfg.max_swaps
    grown = res.mask & ~mask
    assert torch.equal(res.weight[grown], w[grown])
    assert bool((res.weight[~res.mask] == 0).all())


def test_exact_beats_dsnot_on_true_error_with_shifted_inputs() -> None:
    """The prototype's finding in miniature: DSnoT's mean objective can raise the true error."""
    w, stats, _ = setup(11, rows=32, cols=64)
    pattern = SparsityPattern.unstructured(0.6)
    mask = wanda_mask(w, stats.sqnorm, pattern)
    hess = stats.hessian
    ds = dsnot_refine(w, w * mask, mask, stats.tokensum, stats.variance(VarianceKind.WITHIN_SAMPLE),
                      stats.sqnorm, pattern)
    ex = exact_refine(w, w * mask, mask, hess, pattern)
    assert float(row_errors(w, ex.weight, hess).sum()) < float(row_errors(w, ds.weight, hess).sum())
