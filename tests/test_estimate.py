"""`refine --dry-run`: the estimate counts what the driver really allocates and scales as claimed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dsnot_deploy.algorithms.config import (
    Allocation,
    AllocationConfig,
    Method,
    PruneConfig,
    ReconstructConfig,
    Refinement,
    Update,
)
from dsnot_deploy.layerwise.estimate import (
    Rates,
    RunShape,
    estimate,
    estimate_for_spec,
    format_estimate,
    measure_rates,
    shape_of,
)
from dsnot_deploy.sources.streaming_io import build_skeleton
from tests.tiny_models import make_tiny_model, save_tiny_checkpoint

RATES = Rates(matmul_flops=1e10, mask_seconds_per_unit=1e-7)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_shape_counts_match_the_real_model(arch: str, tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "c", arch=arch)
    shape = shape_of(build_skeleton(ckpt, torch.float32))
    model = make_tiny_model(arch)
    assert shape.params == sum(p.numel() for p in model.parameters())  # tied head counted once (gemma3)
    assert shape.layer_params == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.n_layers == 2 and shape.hidden == 64
    assert len(shape.linears) == 7
    # q/k/v share one input, gate/up another; o and down have their own: as the driver's hooks find
    assert sorted(shape.stat_inputs) == [64, 64, 64, 128]


def test_estimate_scales_as_claimed(tmp_path: Path) -> None:
    deep = shape_of(build_skeleton(save_tiny_checkpoint(tmp_path / "d", num_hidden_layers=8), torch.float32))
    shallow = shape_of(build_skeleton(save_tiny_checkpoint(tmp_path / "s", num_hidden_layers=2), torch.float32))
    prune = PruneConfig()
    run = RunShape(nsamples=8, seqlen=32)
    # streaming: memory independent of depth; whole model: grows by the added layers' weights
    s8, s2 = estimate(deep, RunShape(8, 32, stream=True), prune, RATES), estimate(shallow, RunShape(8, 32, stream=True),
                                                                                  prune, RATES)
    assert s8.peak("cpu (host)") == s2.peak("cpu (host)")
    m8, m2 = estimate(deep, run, prune, RATES), estimate(shallow, run, prune, RATES)
    assert m8.peak("cpu (host)") - m2.peak("cpu (host)") == 6 * deep.layer_params * 4
    # activations: two nsamples x seqlen x hidden buffers in the model dtype, wherever they live
    half = estimate(deep, RunShape(8, 32, dtype="bfloat16", activations="disk"), prune, RATES)
    assert half.memory["disk"]["activations (2 x nsamples x seqlen x hidden)"] == 2 * 8 * 32 * 64 * 2
    # time: forward work is linear in the calibration tokens and in depth
    t1 = estimate(deep, RunShape(8, 32), prune, RATES).seconds["forward passes"]
    t2 = estimate(deep, RunShape(16, 32), prune, RATES).seconds["forward passes"]
    assert t2 == pytest.approx(2 * t1)
    assert m8.seconds["forward passes"] == pytest.approx(4 * m2.seconds["forward passes"])
    # the Hessian (and its time) only when the method needs it
    wanda = PruneConfig(method=Method.WANDA, refinement=Refinement.NONE, update=Update.NONE)
    assert "statistics (X^T X)" not in estimate(deep, run, wanda, RATES).seconds
    # reconstruction: its own line, linear in the steps; the allocation's dense pass doubles the forwards
    admm = estimate(deep, run, PruneConfig(refinement=Refinement.NONE), RATES).seconds
    assert admm["reconstruction (ADMM)"] > 0 and "statistics (X^T X)" in admm
    longer = PruneConfig(refinement=Refinement.NONE, reconstruct=ReconstructConfig(iterations=80))
    steps = estimate(deep, run, longer, RATES).seconds["reconstruction (ADMM)"] - admm["reconstruction (ADMM)"]
    assert steps == pytest.approx(sum(40 * 4 * r * c * c for _, r, c in deep.linears) * deep.n_layers / 1e10)
    local = ReconstructConfig(model_correction=0.0)  # no dense stream: calibrate + propagate
    plain = estimate(deep, run, PruneConfig(refinement=Refinement.NONE, reconstruct=local), RATES).seconds
    owl = PruneConfig(refinement=Refinement.NONE, allocation=AllocationConfig(kind=Allocation.OWL), reconstruct=local)
    assert estimate(deep, run, owl, RATES).seconds["forward passes"] == pytest.approx(2 * plain["forward passes"])
    assert admm["forward passes"] == pytest.approx(1.5 * plain["forward passes"])  # the default's dense stream
    assert estimate(deep, run, wanda, RATES).peak("cpu (host)") < m8.peak("cpu (host)")
    assert "SparseGPT" in estimate(deep, run, PruneConfig(method=Method.SPARSEGPT), RATES).seconds


def test_cuda_estimate_splits_device_and_host(tmp_path: Path) -> None:
    shape = shape_of(build_skeleton(save_tiny_checkpoint(tmp_path / "c"), torch.float32))
    est = estimate(shape, RunShape(4, 32, device="cuda:0", stream=True, activations="cpu"), PruneConfig(), RATES)
    assert set(est.memory) == {"cuda:0", "host", "disk"}
    assert "activations (2 x nsamples x seqlen x hidden)" in est.memory["host"]
    text = format_estimate(est)
    assert "cuda:0: peak about" in text and "streaming" in text


def test_measured_rates_and_spec_estimate(tmp_path: Path) -> None:
    rates = measure_rates("cpu", "float32", PruneConfig(), size=128)
    assert rates.matmul_flops > 0 and rates.mask_seconds_per_unit > 0
    ckpt = save_tiny_checkpoint(tmp_path / "c")
    est = estimate_for_spec(str(ckpt), RunShape(4, 32), PruneConfig(), rates)
    assert est.total_seconds > 0 and est.shape is not None and est.shape.n_layers == 2


def test_estimate_counts_the_dense_stream_of_reconstruction_toward_the_dense_model(tmp_path: Path) -> None:
    from dsnot_deploy.layerwise.estimate import ACTIVATIONS, DENSE_ACTIVATIONS

    shape = shape_of(build_skeleton(save_tiny_checkpoint(tmp_path / "c"), torch.float32))
    run = RunShape(8, 32, activations="disk")
    local = estimate(shape, run, PruneConfig(reconstruct=ReconstructConfig(model_correction=0.0)), RATES)
    model = estimate(shape, run, PruneConfig(reconstruct=ReconstructConfig(model_correction=0.25)), RATES)
    assert DENSE_ACTIVATIONS not in local.memory["disk"]
    assert model.memory["disk"][DENSE_ACTIVATIONS] == model.memory["disk"][ACTIVATIONS] == 2 * 8 * 32 * 64 * 4
    # one more forward per layer (3 passes instead of 2) and one more (cols, cols) statistic per input
    assert model.seconds["forward passes"] == pytest.approx(1.5 * local.seconds["forward passes"])
    assert model.peak("cpu (host)") > local.peak("cpu (host)")
