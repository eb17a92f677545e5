"""Per-input-channel calibration statistics of a Linear (algorithms.md section 2), in float32.

Pure tensor code: `accumulate(stats, x)` folds a batch of inputs into the running statistics;
the properties read them out.  One `ChannelStats` serves every Linear that sees the same input
(q/k/v share one, gate/up share one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_deploy.algorithms.config import VarianceKind

VAR_EPS = 1e-8  # guards var_j = 0 (a dead channel) in DSnoT's division


@dataclass
class ChannelStats:
    """Running sums over B samples of L tokens each; `cols` input channels."""

    cols: int
    with_hessian: bool
    device: torch.device | str = "cpu"
    with_cross: bool = False  # also sum_b X_b^T Xd_b against the dense model's inputs (reconstruction target)
    n_samples: int = 0
    n_tokens: int = 0

    def __post_init__(self) -> None:
        f32 = dict(dtype=torch.float32, device=self.device)
        self.sq_sum = torch.zeros(self.cols, **f32)  # sum_b sum_t x^2
        self.tok_sum = torch.zeros(self.cols, **f32)  # sum_b sum_t x
        self.var_within_sum = torch.zeros(self.cols, **f32)  # sum_b var_t(x_b)
        self.pooled_mean = torch.zeros(self.cols, **f32)  # Chan merge over all tokens
        self.pooled_m2 = torch.zeros(self.cols, **f32)
        # (cols, cols) sum_b X_b^T X_b, float32; the SparseGPT statistic without its 2/B factor
        self.xtx = torch.zeros(self.cols, self.cols, **f32) if self.with_hessian else None
        # (cols, cols) sum_b X_b^T Xd_b, X the inputs in the pruned model and Xd the same tokens' in the dense one
        self.xtxd = torch.zeros(self.cols, self.cols, **f32) if self.with_cross else None

    # -- reading out (each divides by B as algorithms.md section 2 states) ---------------
    @property
    def sqnorm(self) -> torch.Tensor:  # (cols,)
        return self.sq_sum / max(self.n_samples, 1)

    @property
    def tokensum(self) -> torch.Tensor:  # (cols,) = L * mean(x_j)
        return self.tok_sum / max(self.n_samples, 1)

    def variance(self, kind: VarianceKind) -> torch.Tensor:  # (cols,), >= VAR_EPS
        if kind is VarianceKind.WITHIN_SAMPLE:
            var = self.var_within_sum / max(self.n_samples, 1)
        else:
            var = self.pooled_m2 / max(self.n_tokens, 1)
        return var.clamp_min(VAR_EPS)

    @property
    def hessian(self) -> torch.Tensor:  # (cols, cols) = (1/B) sum_b X_b^T X_b
        if self.xtx is None:
            raise RuntimeError("statistics were collected without the Hessian")
        return self.xtx / max(self.n_samples, 1)

    @property
    def cross(self) -> torch.Tensor | None:  # (cols, cols) = (1/B) sum_b X_b^T Xd_b, or None
        return None if self.xtxd is None else self.xtxd / max(self.n_samples, 1)


def accumulate(stats: ChannelStats, x: torch.Tensor, dense_x: torch.Tensor | None = None) -> ChannelStats:
    """Fold inputs `x` of shape (b, L, cols) (or (L, cols) for one sample) into `stats`; `dense_x`, the
    same tokens' inputs in the dense model, is needed (and only used) when `stats.with_cross`."""
    if x.dim() == 2:
        x = x.unsqueeze(0)
    x = x.reshape(x.shape[0], -1, x.shape[-1]).to(device=stats.sq_sum.device, dtype=torch.float32)
    b, n_tok, cols = x.shape  # (b, L, cols)
    if cols != stats.cols:
        raise ValueError(f"expected inputs with {stats.cols} channels, got {cols}")
    stats.sq_sum += x.pow(2).sum(dim=(0, 1))
    stats.tok_sum += x.sum(dim=(0, 1))
    stats.var_within_sum += x.var(dim=1, unbiased=False).sum(dim=0)
    # Chan et al. merge of (count, mean, M2) with the batch's own moments: stable in float32.
    flat = x.reshape(-1, cols)  # (b*L, cols)
    n_b = flat.shape[0]
    mean_b = flat.mean(dim=0)
    m2_b = (flat - mean_b).pow(2).sum(dim=0)
    n_a = stats.n_tokens
    total = n_a + n_b
    delta = mean_b - stats.pooled_mean
    stats.pooled_mean += delta * (n_b / total)
    stats.pooled_m2 += m2_b + delta.pow(2) * (n_a * n_b / total)
    if stats.xtx is not None:
        stats.xtx += flat.T @ flat  # (cols, cols)
    if stats.xtxd is not None:
        if dense_x is None or dense_x.numel() != x.numel():
            raise ValueError("statistics with the dense model's inputs need `dense_x` shaped as `x`")
        stats.xtxd += flat.T @ dense_x.reshape(-1, cols).to(flat)
    stats.n_samples += b
    stats.n_tokens = total
    return stats
