"""The exact search's calibration guard: swaps judged on H shrunk toward its diagonal."""

from __future__ import annotations

import pytest
import torch

from dsnot_deploy.algorithms.config import (
    ExactConfig,
    PruneConfig,
    Refinement,
    SparsityPattern,
)
from dsnot_deploy.algorithms.exact import row_errors
from dsnot_deploy.algorithms.pruner import (
    linear_report,
    select_weights,
    shrink_toward_diagonal,
)
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.errors import UserInputError


def _stats(cols: int, seed: int = 0) -> ChannelStats:
    g = torch.Generator().manual_seed(seed)
    stats = ChannelStats(cols, True)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # correlated channels
    accumulate(stats, (torch.randn(4, 48, cols, generator=g) @ mix) * torch.logspace(0, 1, cols))
    return stats


def test_shrink_keeps_the_diagonal_and_scales_the_rest() -> None:
    h = _stats(16).hessian
    for a in (0.0, 0.25, 1.0):
        s = shrink_toward_diagonal(h, a)
        assert torch.equal(s.diagonal(), h.diagonal())
        off = ~torch.eye(16, dtype=torch.bool)
        assert torch.allclose(s[off], (1 - a) * h[off])
    assert shrink_toward_diagonal(h, 0.0) is h
    with pytest.raises(UserInputError):
        ExactConfig(shrink=1.5)


@pytest.mark.parametrize("pattern", [SparsityPattern.unstructured(0.6), SparsityPattern.nm(2, 4)])
def test_shrunk_search_keeps_counts_and_reports_the_true_error(pattern: SparsityPattern) -> None:
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(12, 32, generator=g)
    stats = _stats(32)
    plain = select_weights(weight, stats, PruneConfig(pattern=pattern))
    guarded = select_weights(weight, stats, PruneConfig(pattern=pattern, exact=ExactConfig(shrink=0.5)))
    assert plain.refinement is guarded.refinement is Refinement.EXACT
    assert torch.equal((guarded.sparse == 0).sum(dim=1), (plain.sparse == 0).sum(dim=1))
    assert guarded.errors is None  # its search objective is not the calibration error
    report = linear_report("x", stats, guarded, 0.0)
    true_error = float(row_errors(weight, guarded.sparse, stats.hessian).sum())
    energy = float(row_errors(weight, torch.zeros_like(weight), stats.hessian).sum())
    assert report.output_error_final == pytest.approx(true_error / energy, rel=1e-4)
    # the unguarded search minimises the calibration error itself, so it is at least as low there
    assert float(row_errors(weight, plain.sparse, stats.hessian).sum()) <= true_error * (1 + 1e-6)
