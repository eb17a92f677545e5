"""ADMM weight reconstruction for a fixed mask (algorithms.md section 4c; issue 14 part 1)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dsnot_deploy.algorithms.config import (
    PruneConfig,
    ReconstructConfig,
    Refinement,
    Solver,
    SparsityPattern,
    Update,
)
from dsnot_deploy.algorithms.masks import wanda_mask
from dsnot_deploy.algorithms.pruner import select_weights
from dsnot_deploy.algorithms.reconstruct import (
    admm_reconstruct,
    cg_reconstruct,
    damped_hessian,
    least_squares_reconstruct,
    output_error,
    reconstruct,
    solver_for,
)
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from tests.tiny_models import save_tiny_checkpoint

PATTERNS = [SparsityPattern.unstructured(0.5), SparsityPattern.unstructured(0.7), SparsityPattern.nm(2, 4)]


def _problem(seed: int, rows: int = 8, cols: int = 24, dtype: torch.dtype = torch.float64, spread: float = 3.0):
    """Dense weights and an H with LLM-like spread (channel scales over `spread` decades)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, spread, cols, dtype=dtype)[torch.randperm(cols, generator=g)]
    x = torch.randn(4 * cols, cols, generator=g, dtype=dtype) * scales
    hessian = x.T @ x / x.shape[0]
    dense = torch.randn(rows, cols, generator=g, dtype=dtype)
    return dense, hessian


def _mask(dense: torch.Tensor, hessian: torch.Tensor, pattern: SparsityPattern) -> torch.Tensor:
    return wanda_mask(dense.float(), hessian.diagonal().float(), pattern).bool()


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("seed", [0, 1])
def test_admm_converges_to_the_per_row_least_squares_solution(pattern: SparsityPattern, seed: int) -> None:
    dense, hessian = _problem(seed, spread=1.0)
    mask = _mask(dense, hessian, pattern)
    exact = least_squares_reconstruct(dense, mask, hessian, damping=0.01)
    got = admm_reconstruct(dense, dense * mask, mask, hessian,
                           ReconstructConfig(iterations=600, rho=0.3, growth=1.0, damping=0.01))
    assert (got - exact).abs().max() < 1e-5


def test_least_squares_is_the_minimum_of_the_damped_objective() -> None:
    """The reference itself: no feasible perturbation lowers tr((W - Wd) Hd (W - Wd)^T)."""
    dense, hessian = _problem(3)
    mask = _mask(dense, hessian, PATTERNS[0])
    hd = damped_hessian(hessian, 0.01)
    exact = least_squares_reconstruct(dense, mask, hessian, damping=0.01)
    best = output_error(dense, exact, hd)
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        bumped = exact + 1e-3 * torch.randn(exact.shape, generator=g, dtype=exact.dtype) * mask
        assert output_error(dense, bumped, hd) > best


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("seed", range(4))
def test_default_schedule_lowers_the_error_keeps_zeros_and_the_mask(pattern: SparsityPattern, seed: int) -> None:
    dense, hessian = _problem(seed, rows=16, cols=32, dtype=torch.float32)
    mask = _mask(dense, hessian, pattern)
    start = dense * mask
    got = admm_reconstruct(dense, start, mask, hessian)
    assert output_error(dense, got, hessian) <= output_error(dense, start, hessian)
    assert torch.all(got[~mask] == 0)
    assert int((got != 0).sum()) == int(mask.sum())  # every kept weight stays a kept weight
    assert torch.equal((got != 0), mask)


def test_a_worse_result_is_refused_and_the_start_is_kept() -> None:
    """Starting from the exact optimum (damping 0), one ADMM step can only be worse: the start is returned."""
    dense, hessian = _problem(5, spread=1.0)
    mask = _mask(dense, hessian, PATTERNS[0])
    optimum = least_squares_reconstruct(dense, mask, hessian, damping=0.0)
    got = admm_reconstruct(dense, optimum, mask, hessian, ReconstructConfig(iterations=1, damping=0.0))
    assert torch.equal(got, optimum)


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("seed", [0, 1])
def test_cg_converges_to_the_per_row_least_squares_solution(pattern: SparsityPattern, seed: int) -> None:
    """Conjugate gradients stop on their tolerance at the exact minimiser, even from a wide spread of H."""
    dense, hessian = _problem(seed, spread=3.0)
    mask = _mask(dense, hessian, pattern)
    exact = least_squares_reconstruct(dense, mask, hessian, damping=0.01)
    info: dict = {}
    got = cg_reconstruct(dense, dense * mask, mask, hessian,
                         ReconstructConfig(solver=Solver.CG, cg_iterations=500, cg_tol=1e-15, damping=0.01), info)
    assert (got - exact).abs().max() < 1e-5
    assert info["steps"] < 500 and not info["kept_start"]


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: p.describe())
@pytest.mark.parametrize("seed", range(4))
def test_cg_default_lowers_the_error_keeps_zeros_and_the_mask(pattern: SparsityPattern, seed: int) -> None:
    dense, hessian = _problem(seed, rows=16, cols=32, dtype=torch.float32)
    mask = _mask(dense, hessian, pattern)
    start = dense * mask
    got = cg_reconstruct(dense, start, mask, hessian)
    assert output_error(dense, got, hessian) < output_error(dense, start, hessian)
    assert torch.equal((got != 0), mask)
    # the default's early stop: close to the exact minimiser of the default (damping 0.1) objective
    hd = damped_hessian(hessian.double(), ReconstructConfig().damping)
    exact = least_squares_reconstruct(dense.double(), mask, hessian.double(), damping=ReconstructConfig().damping)
    assert output_error(dense.double(), got.double(), hd) <= output_error(dense.double(), exact, hd) * (1 + 1e-3)


def test_cg_keeps_a_better_start() -> None:
    dense, hessian = _problem(5, spread=1.0)
    mask = _mask(dense, hessian, PATTERNS[0])
    optimum = least_squares_reconstruct(dense, mask, hessian, damping=0.0)
    # damping 1.0 pulls toward the dense weights: the damped optimum has a higher undamped error
    info: dict = {}
    got = cg_reconstruct(dense, optimum, mask, hessian, ReconstructConfig(solver=Solver.CG, damping=1.0), info)
    assert info["kept_start"] and torch.equal(got, optimum)


def test_auto_solver_is_admm_below_the_width_threshold_and_cg_from_it() -> None:
    cfg = ReconstructConfig()
    assert cfg.solver is Solver.AUTO
    assert solver_for(cfg.cg_from_cols - 1, cfg) is Solver.ADMM and solver_for(cfg.cg_from_cols, cfg) is Solver.CG
    assert solver_for(8, ReconstructConfig(solver=Solver.CG)) is Solver.CG
    assert solver_for(10 ** 6, ReconstructConfig(solver=Solver.ADMM)) is Solver.ADMM
    dense, hessian = _problem(2, rows=8, cols=32, dtype=torch.float32)
    mask = _mask(dense, hessian, PATTERNS[0])
    start = dense * mask
    assert torch.equal(reconstruct(dense, start, mask, hessian), admm_reconstruct(dense, start, mask, hessian))
    narrow = ReconstructConfig(cg_from_cols=32)
    assert torch.equal(reconstruct(dense, start, mask, hessian, narrow), cg_reconstruct(dense, start, mask, hessian))


def test_bad_config_and_shapes_are_user_errors() -> None:
    with pytest.raises(UserInputError):
        ReconstructConfig(iterations=0)
    for bad in ({"cg_iterations": 0}, {"cg_tol": -1.0}, {"cg_from_cols": 0}, {"solver": "cg"}):
        with pytest.raises(UserInputError):
            ReconstructConfig(**bad)
    dense, hessian = _problem(0)
    with pytest.raises(UserInputError, match="expected"):
        admm_reconstruct(dense, dense, torch.ones(3, 3, dtype=torch.bool), hessian)
    with pytest.raises(UserInputError, match="expected"):
        cg_reconstruct(dense, dense, torch.ones(3, 3, dtype=torch.bool), hessian)


@pytest.mark.parametrize("refinement", [Refinement.NONE, Refinement.EXACT])
def test_select_weights_with_admm_keeps_positive_zeros_and_counts(refinement: Refinement) -> None:
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=g)
    stats = ChannelStats(32, True)
    accumulate(stats, torch.randn(4, 64, 32, generator=g) * torch.logspace(0, 2, 32))
    base = PruneConfig(pattern=SparsityPattern.nm(2, 4), refinement=refinement)
    plain = select_weights(weight, stats, base)
    admm = select_weights(weight, stats, PruneConfig(pattern=SparsityPattern.nm(2, 4), refinement=refinement,
                                                     update=Update.ADMM))
    assert torch.equal(admm.sparse == 0, plain.sparse == 0)  # same mask, same zero count
    pruned = admm.sparse[admm.sparse == 0]
    assert not torch.signbit(pruned).any()  # +0.0, never -0.0
    h = stats.hessian
    assert output_error(weight, admm.sparse, h) <= output_error(weight, plain.sparse, h)


def test_refine_with_admm_lowers_every_linears_calibration_error(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "tiny", arch="llama")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"line {i}: the quick brown fox jumps over the lazy dog {i % 13}." for i in range(300)))
    runs = {}
    for update in ("none", "admm"):
        out = tmp_path / f"out-{update}"
        assert main(["refine", str(ckpt), str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
                     "--refine", "none", "--update", update, "--measure-error", "-q"]) == 0
        runs[update] = json.loads((out / "sparsity.json").read_text())
    admm = runs["admm"]
    assert admm["update"] == "admm" and admm["settings"]["update"] == "admm"
    assert admm["sparsity"]["pruned_linears"] == runs["none"]["sparsity"]["pruned_linears"] == 0.5
    for lin in admm["linears"]:
        assert lin["output_error_final"] <= lin["output_error_init"] + 1e-12, lin["name"]
    assert admm["error"]["mean_relative_output_error_final"] < runs["none"]["error"]["mean_relative_output_error_final"]


@pytest.mark.parametrize("pattern", [SparsityPattern.unstructured(0.6), SparsityPattern.nm(2, 4)])
def test_alternating_rounds_never_raise_the_calibration_error_and_keep_counts(pattern: SparsityPattern) -> None:
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(16, 32, generator=g)
    stats = ChannelStats(32, True)
    accumulate(stats, torch.randn(4, 64, 32, generator=g) * torch.logspace(0, 2, 32))
    h = stats.hessian
    errors, zeros = [], []
    for rounds in (1, 2, 3):
        config = PruneConfig(pattern=pattern, refinement=Refinement.EXACT, update=Update.ADMM,
                             reconstruct=ReconstructConfig(rounds=rounds))
        sel = select_weights(weight, stats, config)
        errors.append(output_error(weight, sel.sparse, h))
        zeros.append((sel.sparse == 0).sum(dim=1))
    assert errors[1] <= errors[0] * (1 + 1e-6) and errors[2] <= errors[1] * (1 + 1e-6)
    assert all(torch.equal(z, zeros[0]) for z in zeros)


def test_rounds_need_the_exact_search_and_admm() -> None:
    with pytest.raises(UserInputError):
        PruneConfig(refinement=Refinement.DSNOT, update=Update.ADMM, reconstruct=ReconstructConfig(rounds=2))
    with pytest.raises(UserInputError):
        PruneConfig(refinement=Refinement.EXACT, update=Update.NONE, reconstruct=ReconstructConfig(rounds=2))
    with pytest.raises(UserInputError):
        ReconstructConfig(rounds=0)
