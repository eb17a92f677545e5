"""scripts/bench_pipeline.py's held-out errors: the layer outputs it compares are the model's own, and
the model-level error is zero for the dense model and positive once a layer is pruned."""

from __future__ import annotations

import pytest
import torch

from dsnot_deploy.sources.models import find_decoder_layers
from tests.script_loader import load_script
from tests.tiny_models import ARCHS, make_tiny_model


def _bench():
    return load_script("bench_pipeline")


@pytest.mark.parametrize("arch", ARCHS)
def test_layer_outputs_are_the_models_hidden_states(arch: str) -> None:
    bench = _bench()
    model = make_tiny_model(arch)
    _, layers = find_decoder_layers(model)
    windows = torch.randint(4, 128, (2, 16))
    outputs = bench.layer_outputs(model, layers, windows)
    with torch.no_grad():
        hidden = model(windows, output_hidden_states=True).hidden_states
    assert len(outputs) == len(layers)
    # hidden_states[i + 1] is layer i's output (the last one has the final norm applied, so not compared)
    for i in range(len(layers) - 1):
        torch.testing.assert_close(outputs[i], hidden[i + 1], rtol=1e-5, atol=1e-5)


def test_model_error_is_zero_dense_and_grows_from_the_pruned_layer_on() -> None:
    bench = _bench()
    model = make_tiny_model("llama", num_hidden_layers=3)
    layers_path, layers = find_decoder_layers(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    windows = torch.randint(4, 128, (2, 16))
    dense_out = bench.layer_outputs(model, layers, windows)
    local, model_err = bench.heldout_layer_errors(model, layers, dense_state, layers_path, windows, dense_out)
    assert max(local) == 0 and max(model_err) < 1e-10
    with torch.no_grad():
        weight = layers[1].mlp.down_proj.weight
        weight[weight.abs() < weight.abs().median()] = 0
    local, model_err = bench.heldout_layer_errors(model, layers, dense_state, layers_path, windows, dense_out)
    assert local[0] == 0 and local[1] > 0
    assert model_err[0] < 1e-10 and model_err[1] > 0 and model_err[2] > 0


def test_variant_grammar_sets_every_stage_and_rejects_unknown_parts() -> None:
    from dsnot_deploy.algorithms.config import Allocation, Method, Refinement, Update

    bench = _bench()
    assert bench.parse_variant("dense") is None
    cfg = bench.parse_variant("sparsegpt+exact@0.3+admm@model0.5+rounds@2+owl")
    assert cfg.method is Method.SPARSEGPT and cfg.refinement is Refinement.EXACT
    assert cfg.exact.shrink == 0.3 and cfg.update is Update.ADMM
    assert cfg.reconstruct.model_correction == 0.5 and cfg.reconstruct.rounds == 2
    assert cfg.allocation.kind is Allocation.OWL
    plain = bench.parse_variant("wanda")
    assert plain.update is Update.NONE and plain.reconstruct.rounds == 1 and plain.reconstruct.model_correction == 0
    for bad in ("wanda+rounds@0", "wanda+rounds@x", "wanda+admm@0.5", "wanda+bogus"):
        with pytest.raises(SystemExit):
            bench.parse_variant(bad)
