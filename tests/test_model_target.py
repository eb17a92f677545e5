"""Reconstruction toward the dense model's outputs (`--model-correction A`, algorithms.md 4c)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsnot_deploy.algorithms import pruner
from dsnot_deploy.algorithms.config import (
    Method,
    PruneConfig,
    ReconstructConfig,
    Refinement,
    SparsityPattern,
    Update,
)
from dsnot_deploy.algorithms.masks import wanda_mask
from dsnot_deploy.algorithms.reconstruct import (
    damped_hessian,
    least_squares_reconstruct,
    model_target,
)
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise import driver as driver_module
from dsnot_deploy.layerwise.driver import DriverConfig, run_layers
from dsnot_deploy.sources.models import find_decoder_layers
from tests.tiny_models import ARCHS, make_tiny_model


def _inputs(seed: int, tokens: int = 96, cols: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs in the pruned model and, correlated with them, the same tokens' inputs in the dense model."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(0, 1.5, cols, dtype=torch.float64)
    xd = torch.randn(tokens, cols, generator=g, dtype=torch.float64) * scales
    xs = xd + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64) * scales
    return xs, xd


@pytest.mark.parametrize("seed", [0, 1])
def test_model_target_is_the_dense_weights_when_both_models_see_the_same_inputs(seed: int) -> None:
    xs, _ = _inputs(seed)
    hessian = xs.T @ xs / xs.shape[0]
    dense = torch.randn(6, xs.shape[1], generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    torch.testing.assert_close(model_target(dense, hessian, hessian, 0.1), dense, rtol=0, atol=1e-10)
    xd = _inputs(seed + 5)[1]
    torch.testing.assert_close(model_target(dense, hessian, xs.T @ xd / xs.shape[0], 0.1, 0.0), dense, rtol=0, atol=0)


@pytest.mark.parametrize("pattern", [SparsityPattern.unstructured(0.5), SparsityPattern.nm(2, 4)],
                         ids=lambda p: p.describe())
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("strength", [1.0, 0.25])
def test_reconstructing_toward_the_target_solves_the_dense_model_objective(pattern: SparsityPattern,
                                                                          seed: int, strength: float) -> None:
    """Per row, min over w (zero off the mask) of (1 - A) ||X (w - wd)||^2 / N + A ||X w - Xd wd||^2 / N
    + lambda ||w - wd||^2, solved directly."""
    xs, xd = _inputs(seed)
    n = xs.shape[0]
    hessian, cross = xs.T @ xs / n, xs.T @ xd / n
    dense = torch.randn(6, xs.shape[1], generator=torch.Generator().manual_seed(10 + seed), dtype=torch.float64)
    mask = wanda_mask(dense.float(), hessian.diagonal().float(), pattern).bool()
    damping = 0.1
    got = least_squares_reconstruct(model_target(dense, hessian, cross, damping, strength), mask, hessian, damping)
    lam = float(damped_hessian(hessian, damping).diagonal().mean() - hessian.diagonal().mean())
    want = torch.zeros_like(dense)
    for r in range(dense.shape[0]):
        k = mask[r]
        lhs = hessian[k][:, k] + lam * torch.eye(int(k.sum()), dtype=torch.float64)
        mixed = (1 - strength) * hessian + strength * cross
        want[r, k] = torch.linalg.solve(lhs, (mixed @ dense[r])[k] + lam * dense[r, k])
    assert (got - want).abs().max() < 1e-8
    assert bool((got[~mask] == 0).all())
    # and it fits the dense model's outputs better than matching the dense Linear on the same inputs does
    local = least_squares_reconstruct(dense, mask, hessian, damping)

    def model_error(w: torch.Tensor) -> float:
        return float((xs @ w.T - xd @ dense.T).pow(2).sum())

    assert model_error(got) < model_error(local)


def test_cross_statistics_pair_the_same_tokens() -> None:
    xs, xd = _inputs(0, tokens=40)
    st = ChannelStats(xs.shape[1], with_hessian=True, with_cross=True)
    accumulate(st, xs[:20].float().unsqueeze(0), xd[:20].float().unsqueeze(0))
    accumulate(st, xs[20:].float().unsqueeze(0), xd[20:].float().unsqueeze(0))
    torch.testing.assert_close(st.cross, (xs.T @ xd / 2).float(), rtol=1e-5, atol=1e-3)
    with pytest.raises(ValueError, match="dense_x"):
        accumulate(st, xs[:4].float())


def test_model_correction_needs_the_admm_update_and_a_strength_in_range() -> None:
    assert not PruneConfig(update=Update.NONE).matches_dense_model  # the default strength only applies to ADMM
    assert PruneConfig(update=Update.ADMM).matches_dense_model
    assert not PruneConfig(reconstruct=ReconstructConfig(model_correction=0.0)).matches_dense_model
    with pytest.raises(UserInputError, match=r"in \[0, 1\]"):
        ReconstructConfig(model_correction=-0.1)


def _linear_inputs(model, ids: torch.Tensor, suffix: str) -> dict[int, torch.Tensor]:
    """Per decoder layer, the inputs of its Linear named `suffix`, (tokens, cols)."""
    _, layers = find_decoder_layers(model)
    got: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(layers):
        mod = dict(layer.named_modules())[suffix]
        handles.append(mod.register_forward_hook(
            lambda m, a, o, i=i: got.__setitem__(i, a[0].detach().reshape(-1, a[0].shape[-1]).double())))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return got


@pytest.mark.parametrize("arch", ARCHS)
def test_driver_pairs_each_layer_with_the_dense_models_inputs(arch: str, monkeypatch) -> None:
    """The cross statistic of each layer's first Linear is X^T Xd / B with X from the pruned prefix and
    Xd from the dense model: the dense stream advances with the dense layers, token for token."""
    model = make_tiny_model(arch)
    dense_model = make_tiny_model(arch)
    dense_model.load_state_dict(model.state_dict())
    ids = torch.randint(4, 128, (4, 32), generator=torch.Generator().manual_seed(0))
    seen: dict[int, torch.Tensor] = {}
    real = pruner.model_target
    calls: list[torch.Tensor] = []
    monkeypatch.setattr(pruner, "model_target",
                        lambda d, h, c, p, a: (calls.append(c.clone()), real(d, h, c, p, a))[1])
    real_prune = driver_module.prune_linear

    def prune_linear(name, weight, stats, config, refine):
        index, _, linear = name.partition(".")
        if linear == "self_attn.q_proj":
            seen[int(index)] = stats.cross.double()
        return real_prune(name, weight, stats, config, refine)

    monkeypatch.setattr(driver_module, "prune_linear", prune_linear)
    prune = PruneConfig(method=Method.WANDA, pattern=SparsityPattern.unstructured(0.5), refinement=Refinement.NONE,
                        reconstruct=ReconstructConfig(model_correction=0.25))
    _, layers = find_decoder_layers(model)
    run_layers(model, layers, ids, DriverConfig(prune=prune, batch_size=2, progress=False))
    assert len(calls) == 7 * len(layers)  # every Linear was reconstructed toward the dense model
    sparse_inputs = _linear_inputs(model, ids, "self_attn.q_proj")  # the pruned prefix (q_proj's own layer
    dense_inputs = _linear_inputs(dense_model, ids, "self_attn.q_proj")  # is not involved in its input)
    assert sorted(seen) == list(range(len(layers)))
    for i in seen:
        want = sparse_inputs[i].T @ dense_inputs[i] / ids.shape[0]
        torch.testing.assert_close(seen[i], want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert not torch.allclose(sparse_inputs[len(layers) - 1], dense_inputs[len(layers) - 1])


@pytest.mark.parametrize("extra,message", [
    (("--model-correction", "1.5"), "model correction in [0, 1]"),
    (("--model-correction", "0.25", "--update", "none"), "--update admm with --model-correction"),
])
def test_refine_rejects_a_bad_model_correction(tmp_path: Path, capsys, extra, message) -> None:
    from dsnot_deploy.cli import main
    from tests.reliability_helpers import TEXT, refine_args
    from tests.tiny_models import save_tiny_checkpoint

    ckpt = save_tiny_checkpoint(tmp_path / "c")
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    assert main(refine_args(ckpt, text, tmp_path / "out", *extra)) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
