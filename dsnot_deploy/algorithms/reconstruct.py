"""Weight reconstruction for a fixed mask (algorithms.md section 4c).

Given a Linear's dense weights ``Wd`` (rows, cols), its final kept-mask ``K`` and ``H = (1/B) sum
X^T X``, find ``W`` with ``W = 0`` off ``K`` minimising the damped calibration output error
``tr((W - Wd) Hd (W - Wd)^T)``, ``Hd = H + lambda I`` (``lambda = damping * mean(diag H)``, dead
columns' diagonal set to 1 as SparseGPT does). Rows are independent and share ``Hd``.

- :func:`least_squares_reconstruct`: the exact per-row solution ``w_K = wd_K + Hd_KK^-1 Hd_KP wd_P``
  (``P`` = pruned columns); one solve per row, the reference for tests on small matrices.
- :func:`admm_reconstruct`: ADMM on all rows at once with one eigendecomposition of ``Hd`` serving
  every penalty ``rho`` of an increasing schedule, ending on the exact projection onto the mask.
  If the result does not lower the undamped output error of the starting weights, the starting
  weights are kept, so reconstruction never makes a Linear worse on its calibration data.
- :func:`cg_reconstruct`: conjugate gradients (Jacobi preconditioner) on the kept entries of all rows at
  once, started from the current sparse weights: one (rows x cols)(cols x cols) product per step and no
  factorisation of ``Hd``; it stops early once a step lowers the damped objective by less than ``cg_tol``
  of its value, and keeps the start under the same guard (errors from the tracked gradient, no extra product).
- :func:`reconstruct`: the configured solver; ``auto`` runs ADMM on Linears narrower than ``cg_from_cols``
  columns and conjugate gradients from there (docs/bench_reconstruct_scale.md).
"""

from __future__ import annotations

import torch

from dsnot_deploy.algorithms.config import ReconstructConfig, Solver
from dsnot_deploy.errors import UserInputError


def damped_hessian(hessian: torch.Tensor, damping: float) -> torch.Tensor:
    """``H`` with dead columns' diagonal set to 1 and ``damping * mean(diag)`` added to the diagonal."""
    hd = hessian.clone()
    diag = hd.diagonal()
    diag[diag == 0] = 1.0
    diag.add_(damping * diag.mean())
    return hd


def model_target(dense: torch.Tensor, hessian: torch.Tensor, cross: torch.Tensor, damping: float,
                 strength: float = 1.0) -> torch.Tensor:
    """The weights ``T`` whose layer objective ``tr((W - T) Hd (W - T)^T)`` equals, up to a constant,
    ``(1 - A) ||(Wd - W) X||^2 / B + A ||Wd Xd - W X||^2 / B + lambda ||W - Wd||^2`` (``A = strength``):
    with ``A = 1`` the pruned Linear matches the dense *model's* outputs (``Xd``: the same tokens' inputs
    in the dense model, ``cross = X^T Xd / B``), with the ridge pulling toward ``Wd``.
    ``T = Wd + A Wd (C^T - H) Hd^-1``; with ``Xd = X`` or ``A = 0`` it is ``Wd``."""
    hd = damped_hessian(hessian, damping)
    wd = dense.to(hd.dtype)
    shift = wd @ (cross.T - hessian).to(hd.dtype)  # (rows, cols); Hd is symmetric, so T - Wd = A shift Hd^-1
    factor = torch.linalg.cholesky(hd)
    return wd + strength * torch.cholesky_solve(shift.T, factor).T


def output_error(dense: torch.Tensor, weight: torch.Tensor, hessian: torch.Tensor) -> float:
    """``sum_i dw_i^T H dw_i`` with ``dw = dense - weight`` (float64 reduction)."""
    dw = (dense - weight).to(hessian.dtype)
    return float(((dw @ hessian) * dw).sum(dtype=torch.float64))


def least_squares_reconstruct(dense: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                              damping: float = 0.01) -> torch.Tensor:
    """The exact minimiser, row by row (see the module docstring); same dtype as ``hessian``."""
    hd = damped_hessian(hessian, damping)
    wd = dense.to(hd.dtype)
    out = torch.zeros_like(wd)
    for r in range(wd.shape[0]):
        keep = mask[r]
        drop = ~keep
        if not keep.any():
            continue
        rhs = hd[keep][:, drop] @ wd[r, drop]
        out[r, keep] = wd[r, keep] + torch.linalg.solve(hd[keep][:, keep], rhs)
    return out


def _check_shapes(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor) -> None:
    if dense.shape != mask.shape or start.shape != mask.shape or hessian.shape != (mask.shape[1],) * 2:
        raise UserInputError(f"expected (rows, cols) weights and mask and a (cols, cols) H; found {tuple(dense.shape)}, "
                             f"{tuple(mask.shape)}, {tuple(hessian.shape)}")


def solver_for(cols: int, config: ReconstructConfig) -> Solver:
    """The solver that reconstructs a Linear of ``cols`` input columns under ``config``."""
    if config.solver is Solver.AUTO:
        return Solver.CG if cols >= config.cg_from_cols else Solver.ADMM
    return config.solver


def reconstruct(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                config: ReconstructConfig = ReconstructConfig()) -> torch.Tensor:
    """Reconstructed weights by the configured solver (see :func:`admm_reconstruct`)."""
    if solver_for(mask.shape[-1], config) is Solver.CG:
        return cg_reconstruct(dense, start, mask, hessian, config)
    return admm_reconstruct(dense, start, mask, hessian, config)


def cg_reconstruct(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                   config: ReconstructConfig = ReconstructConfig(), info: dict | None = None) -> torch.Tensor:
    """As :func:`admm_reconstruct`, by at most ``config.cg_iterations`` conjugate-gradient steps; ``info``, when
    given, receives ``steps`` (the steps taken) and ``kept_start`` (True when the guard kept the start)."""
    _check_shapes(dense, start, mask, hessian)
    dtype = hessian.dtype
    keep = mask.to(dtype)
    hd = damped_hessian(hessian, config.damping)
    ridge = hd.diagonal() - hessian.diagonal()  # Hd - H is diagonal
    wd = dense.to(dtype)
    start = start.to(dtype) * keep
    w = start
    g = (w - wd) @ hd  # half the gradient of f(W) = tr((W - Wd) Hd (W - Wd)^T)

    def undamped(w: torch.Tensor, g: torch.Tensor) -> float:  # f(W) - sum dw^2 (Hd - H)_jj, no product
        dw = w - wd
        return float((dw * g).sum(dtype=torch.float64) - (dw * dw * ridge).sum(dtype=torch.float64))

    error_start = undamped(w, g)
    objective = float(((w - wd) * g).sum(dtype=torch.float64))
    minv = keep / hd.diagonal()
    r = -g * keep
    z = r * minv
    p = z
    rz = (r * z).sum(dim=1, keepdim=True)
    tiny = torch.finfo(dtype).tiny
    steps = 0
    for steps in range(1, config.cg_iterations + 1):
        q = p @ hd
        pq = (p * q).sum(dim=1, keepdim=True)
        alpha = torch.where(pq > 0, rz / pq.clamp_min(tiny), torch.zeros_like(pq))
        w = w + alpha * p
        g = g + alpha * q
        decrease = float((alpha * rz).sum(dtype=torch.float64))  # f(W) - f(W + alpha P), all rows
        objective -= decrease
        r = -g * keep
        z = r * minv
        rz_new = (r * z).sum(dim=1, keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
        p = z + beta * p
        rz = rz_new
        if not decrease > config.cg_tol * objective:  # converged (or nothing left to lower)
            break
    w = w * keep  # exact zeros off the mask, whatever rounding did
    better = undamped(w, g) <= error_start
    if info is not None:
        info.update(steps=steps, kept_start=not better)
    return w if better else start


def admm_reconstruct(dense: torch.Tensor, start: torch.Tensor, mask: torch.Tensor, hessian: torch.Tensor,
                     config: ReconstructConfig = ReconstructConfig()) -> torch.Tensor:
    """Reconstructed weights (dtype of ``hessian``, exact zeros off ``mask``), or ``start`` itself when
    that has the lower undamped output error. ``start``: the current sparse weights (zeros off ``mask``)."""
    _check_shapes(dense, start, mask, hessian)
    dtype = hessian.dtype
    keep = mask.to(dtype)
    hd = damped_hessian(hessian, config.damping)
    evals, evecs = torch.linalg.eigh(hd)  # Hd = Q diag(L) Q^T
    wd = dense.to(dtype)
    wd_hd = wd @ hd
    z = start.to(dtype) * keep
    u = torch.zeros_like(z)
    rho = config.rho * float(hd.diagonal().mean())
    for _ in range(config.iterations):
        # W = (Wd Hd + rho (Z - U)) (Hd + rho I)^-1, through the eigenbasis of Hd
        w = (((wd_hd + rho * (z - u)) @ evecs) / (evals + rho)) @ evecs.T
        z = (w + u) * keep
        u = u + w - z
        rho *= config.growth
        u = u / config.growth
    z = z * keep  # exact zeros off the mask, whatever rounding did
    start = start.to(dtype) * keep
    return z if output_error(dense, z, hessian) <= output_error(dense, start, hessian) else start
