"""The layer-sequential driver on tiny random models of every supported architecture."""

from __future__ import annotations

import pytest
import torch

from dsnot_deploy.algorithms.config import (
    Method,
    PruneConfig,
    Refinement,
    SparsityPattern,
)
from dsnot_deploy.layerwise.capture import LayerCall, capture_layer_inputs
from dsnot_deploy.layerwise.driver import (
    DriverConfig,
    _calibrate,
    _linears,
    linear_group,
    run_layers,
)
from dsnot_deploy.sources.models import find_decoder_layers
from tests.tiny_models import ARCHS, make_tiny_model

SEQ = 32  # longer than the Gemma3 tiny model's sliding window (8)


def _ids(n: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, 128, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


@pytest.mark.parametrize("arch", ARCHS)
def test_unpruned_pass_reproduces_the_model(arch: str) -> None:
    model = make_tiny_model(arch)
    ids = _ids()
    want = _final_hidden(model, ids)
    _, layers = find_decoder_layers(model)
    res = run_layers(model, layers, ids, DriverConfig(prune=None, batch_size=2, progress=False))
    with torch.no_grad():
        got = model.model.norm(res.hidden)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_gemma3_layers_get_their_own_arguments() -> None:
    """With layer 0's arguments everywhere (the reference's shortcut), the global layer would be wrong."""
    model = make_tiny_model("gemma3")
    assert model.config.layer_types[:2] == ["sliding_attention", "full_attention"]
    ids = _ids()
    _, layers = find_decoder_layers(model)
    hidden, calls = capture_layer_inputs(model, layers, ids, 4, "cpu", "cpu")
    with torch.no_grad():
        right = layers[1](layers[0](hidden, *calls[0].args, **calls[0].kwargs), *calls[1].args, **calls[1].kwargs)
        wrong = layers[1](layers[0](hidden, *calls[0].args, **calls[0].kwargs), *calls[0].args, **calls[0].kwargs)
    assert not torch.allclose(right, wrong, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("refinement", list(Refinement))
def test_pruned_layers_are_exact_and_propagate(arch: str, refinement: Refinement) -> None:
    model = make_tiny_model(arch)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    _, layers = find_decoder_layers(model)
    prune = PruneConfig(method=Method.WANDA, pattern=SparsityPattern.nm(2, 4), refinement=refinement)
    res = run_layers(model, layers, ids, DriverConfig(prune=prune, progress=False, measure_error=True))
    n_linears = 0
    for layer in layers:
        for name, mod in _linears(layer).items():
            groups = (mod.weight == 0).reshape(mod.weight.shape[0], -1, 4).sum(dim=2)
            assert bool((groups >= 2).all()), name
            n_linears += 1
    assert n_linears == sum(len(layer.linears) for layer in res.layers) == 7 * len(layers)
    after = model.state_dict()
    for key, value in before.items():  # only decoder Linear weights change
        if ".layers." in key and key.endswith("proj.weight"):
            continue
        assert torch.equal(after[key], value), key
    # the propagate pass ran the sparse layers: its output equals the pruned model's own forward
    with torch.no_grad():
        torch.testing.assert_close(model.model.norm(res.hidden), _final_hidden(model, ids), rtol=1e-5, atol=1e-5)
    for lin in (lin for layer in res.layers for lin in layer.linears):
        if refinement is Refinement.EXACT:
            assert lin.output_error_final <= lin.output_error_init * (1 + 1e-6)


def test_linears_that_share_an_input_share_statistics() -> None:
    model = make_tiny_model("llama")
    _, layers = find_decoder_layers(model)
    hidden, calls = capture_layer_inputs(model, layers, _ids(), 1, "cpu", "cpu")
    stats = _calibrate(layers[0], _linears(layers[0]), hidden, calls[0],
                       DriverConfig(prune=PruneConfig(), progress=False), with_hessian=False)
    assert stats["self_attn.q_proj"] is stats["self_attn.k_proj"] is stats["self_attn.v_proj"]
    assert stats["mlp.gate_proj"] is stats["mlp.up_proj"]
    assert stats["self_attn.o_proj"] is not stats["self_attn.q_proj"]
    assert stats["mlp.down_proj"].cols == 128
    assert stats["self_attn.q_proj"].n_samples == 4  # accumulated once per sample, not three times
    # statistics of layer 0 are those of its real input: the normed hidden states
    with torch.no_grad():
        normed = layers[0].input_layernorm(hidden)
    torch.testing.assert_close(stats["self_attn.q_proj"].sqnorm, normed.pow(2).sum(dim=(0, 1)) / 4)


def test_skip_refine_group_leaves_that_group_unrefined() -> None:
    model = make_tiny_model("llama")
    _, layers = find_decoder_layers(model)
    prune = PruneConfig(pattern=SparsityPattern.unstructured(0.5), refinement=Refinement.DSNOT,
                        skip_refine_groups=("mlp",))
    res = run_layers(model, layers, _ids(), DriverConfig(prune=prune, progress=False))
    for lin in (lin for layer in res.layers for lin in layer.linears):
        group = linear_group(lin.name.split(".", 1)[1])
        if group == "mlp":
            assert lin.swaps_max == 0
    assert any(lin.swaps_max > 0 for layer in res.layers for lin in layer.linears)


def test_half_precision_model_keeps_exact_zeros() -> None:
    model = make_tiny_model("llama").to(torch.bfloat16)
    _, layers = find_decoder_layers(model)
    prune = PruneConfig(pattern=SparsityPattern.unstructured(0.5), refinement=Refinement.EXACT)
    run_layers(model, layers, _ids(), DriverConfig(prune=prune, progress=False))
    w = layers[0].self_attn.q_proj.weight
    assert w.dtype == torch.bfloat16
    assert bool(((w == 0).sum(dim=1) >= 32).all())


def test_layer_call_is_plain_data() -> None:
    call = LayerCall(args=(), kwargs={"x": 1})
    assert call.kwargs == {"x": 1}
