"""In-refinement quantization onto ggml lattices (dsnot_deploy.quant, issue 15): the lattice rules,
the GPTQ sweep's invariants, and checkpoints that `export` writes with no second rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsnot_deploy.algorithms.config import (
    PruneConfig,
    Refinement,
    SparsityPattern,
    Update,
)
from dsnot_deploy.algorithms.reconstruct import output_error
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob, refine
from dsnot_deploy.quant import gptq
from dsnot_deploy.quant.gptq import QuantizeConfig, gptq_sweep, quantize_weight
from dsnot_deploy.quant.lattice import (
    LATTICES,
    ggml_round_trip,
    is_on_lattice,
    parse_lattice,
)
from tests.tiny_models import checkpoint_tensors, save_tiny_checkpoint

TYPES = sorted(LATTICES)
TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog, then sleeps." for i in range(300))


def _problem(rows: int = 24, cols: int = 128, seed: int = 0, sparsity: float = 0.5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, cols, generator=g) @ (torch.eye(cols) + 0.2 * torch.randn(cols, cols, generator=g))
    h = x.T @ x / x.shape[0]
    w = torch.randn(rows, cols, generator=g)
    mask = torch.rand(rows, cols, generator=g) >= sparsity
    return (w * mask) + 0.0, h, mask


@pytest.mark.parametrize("name", TYPES)
def test_ggml_round_trip_is_idempotent_and_matches_the_level_range(name: str) -> None:
    lat = LATTICES[name]
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    once = ggml_round_trip(w, lat)
    assert is_on_lattice(once, lat)  # ggml reproduces its own output
    assert not is_on_lattice(w, lat)
    blocks = once.reshape(-1, lat.block)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    k = blocks / np.where(amax == 0, 1, amax) * abs(lat.anchor)
    assert np.allclose(k, np.round(k), atol=1e-3)  # integer levels on the block's scale


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shrinks,scales", [((1.0,), "anchor"), ((1.0, 0.9, 0.8), "anchor"), ((1.0,), "search")])
def test_sweep_lands_on_the_lattice_keeps_zeros_and_beats_round_to_nearest(name: str, shrinks, scales) -> None:
    w, h, mask = _problem(seed=2)
    cfg = QuantizeConfig(type=name, shrinks=shrinks, scales=scales)
    q = gptq_sweep(w, h, cfg)
    assert is_on_lattice(q, LATTICES[name])  # ggml's quantizer writes exactly these values
    pruned = ~mask
    assert q[pruned].view(torch.int32).eq(0).all()  # +0.0, bit for bit
    rtn = torch.from_numpy(ggml_round_trip(w, LATTICES[name]))
    assert output_error(w, q, h) < output_error(w, rtn, h)


def test_the_sweep_on_a_dense_matrix_quantizes_every_weight() -> None:
    w, h, _ = _problem(sparsity=0.0, seed=3)
    q = gptq_sweep(w, h, QuantizeConfig(type="Q4_0"))
    assert is_on_lattice(q, LATTICES["Q4_0"])
    assert output_error(w, q, h) < output_error(w, torch.from_numpy(ggml_round_trip(w, LATTICES["Q4_0"])), h)


def test_round_to_nearest_is_kept_when_the_sweep_is_worse(monkeypatch) -> None:
    w, h, _ = _problem(seed=4)
    monkeypatch.setattr(gptq, "gptq_sweep", lambda weight, hessian, config, lattice=None: torch.zeros_like(weight))
    result = quantize_weight(w, h, QuantizeConfig(type="Q8_0"))
    assert not result.used_sweep and result.error_sweep > result.error_rtn
    assert torch.equal(result.weight, torch.from_numpy(ggml_round_trip(w, LATTICES["Q8_0"])) + 0.0)


def test_config_and_width_errors() -> None:
    with pytest.raises(UserInputError, match="Q8_0, Q5_0, Q4_0"):
        parse_lattice("Q4_K")
    with pytest.raises(UserInputError):
        QuantizeConfig(blocksize=48)
    with pytest.raises(UserInputError):
        QuantizeConfig(shrinks=(1.2,))
    with pytest.raises(UserInputError, match="anchor, search"):
        QuantizeConfig(scales="free")
    w, h, _ = _problem(cols=40)
    with pytest.raises(UserInputError, match="multiple of 32"):
        gptq_sweep(w, h, QuantizeConfig())


# -- the refine job and export ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("quant")
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return save_tiny_checkpoint(root / "ckpt", arch="qwen3"), calib


def _refine(tiny, out: Path, quantize: QuantizeConfig, prune: PruneConfig | None = None, **job) -> dict:
    ckpt, calib = tiny
    return refine(RefineJob(model=str(ckpt), outdir=out, prune=prune or PruneConfig(),
                            calibration=CalibrationConfig(str(calib), 4, 32, 0), progress=False, quantize=quantize,
                            **job))


def _gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    import gguf
    from gguf import quants

    out = {}
    for t in gguf.GGUFReader(path).tensors:
        if t.name.startswith("blk.") and len(t.shape) == 2:
            out[t.name] = quants.dequantize(t.data, t.tensor_type).reshape(int(t.shape[1]), int(t.shape[0]))
    return out


@pytest.mark.parametrize("name,scales", [(t, "anchor") for t in TYPES] + [("Q4_0", "search"), ("Q5_0", "search")])
def test_quantized_checkpoint_is_written_by_export_with_no_second_rounding(tiny, tmp_path: Path, name: str,
                                                                         scales: str) -> None:
    from safetensors.torch import load_file

    from converters.gguf_export import ExportConfig, export_gguf

    manifest = _refine(tiny, tmp_path / "q", QuantizeConfig(type=name, scales=scales))
    record = manifest["quantize"]
    assert record["type"] == name and record["linears_quantized"] == len(manifest["linears"])
    assert record["mean_relative_error"] <= record["mean_relative_error_rtn"]
    weights = {k: v for k, v in load_file(tmp_path / "q" / "model.safetensors").items()
               if ".layers." in k and k.endswith("proj.weight")}
    assert weights and all(is_on_lattice(v, LATTICES[name]) for v in weights.values())
    if scales == "search":  # searched scales are not ggml's: its own quantizer would round a second time
        assert not all(np.array_equal(ggml_round_trip(v, LATTICES[name]), v.numpy()) for v in weights.values())
    added = {q["name"]: q["zeros_added"] for q in record["linears"]}
    for lin in manifest["linears"]:  # pruned zeros kept; kept weights at level 0 counted in the record
        layer, sub = lin["name"].split(".", 1)
        zeros = int((weights[f"model.layers.{layer}.{sub}.weight"] == 0).sum())
        assert zeros == lin["zeros"] + added[lin["name"]] and added[lin["name"]] >= 0
    report = export_gguf(tmp_path / "q", tmp_path / "q.gguf", ExportConfig(qtype=name, progress=False))
    assert report["zeros"]["tensors_written_exactly"] == report["zeros"]["tensors"] == len(weights)
    written = _gguf_tensors(tmp_path / "q.gguf")
    hf = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}
    assert len(written) == len(weights)
    for gname, values in written.items():
        _, layer, kind, _ = gname.split(".")
        source = weights[f"model.layers.{layer}.{hf[kind]}.weight"].numpy()
        assert np.array_equal((values + np.float32(0)).view(np.uint32), source.view(np.uint32)), gname


def test_export_of_an_unquantized_checkpoint_rounds_it(tiny, tmp_path: Path) -> None:
    from converters.gguf_export import ExportConfig, export_gguf

    ckpt, _ = tiny
    report = export_gguf(ckpt, tmp_path / "d.gguf", ExportConfig(qtype="Q4_0", progress=False))
    assert report["zeros"]["tensors"] > 0 and report["zeros"]["tensors_written_exactly"] == 0


def test_dense_quantization_only_through_the_driver(tiny) -> None:
    from dsnot_deploy.layerwise.driver import DriverConfig, run_layers
    from dsnot_deploy.sources.models import find_decoder_layers, load_model

    ckpt, _ = tiny
    model = load_model(str(ckpt), dtype=torch.float32, device="cpu").model
    _, layers = find_decoder_layers(model)
    samples = torch.randint(0, 64, (4, 32), generator=torch.Generator().manual_seed(0))
    result = run_layers(model, layers, samples, DriverConfig(prune=None, progress=False,
                                                              quantize=QuantizeConfig(type="Q5_0")))
    reports = [q for layer in result.layers for q in layer.quant]
    assert len(reports) == 2 * 7 and all(q.type == "Q5_0" for q in reports)
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                assert is_on_lattice(mod.weight, LATTICES["Q5_0"])


def test_cli_quantize_option_and_its_errors(tiny, tmp_path: Path) -> None:
    ckpt, calib = tiny
    common = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--refine", "none", "--update", "none", "-q"]
    assert main(["refine", str(ckpt), str(tmp_path / "a"), *common, "--pattern", "2:4", "--quantize", "q4_0",
                 "--quant-shrinks", "1.0", "0.9", "--quant-scales", "search"]) == 0
    m = json.loads((tmp_path / "a" / "sparsity.json").read_text())
    assert m["quantize"]["type"] == "Q4_0" and m["quantize"]["settings"]["shrinks"] == [1.0, 0.9]
    assert m["quantize"]["settings"]["scales"] == "search"
    assert main(["refine", str(ckpt), str(tmp_path / "b"), *common, "--quantize", "Q4_0", "--dtype", "bfloat16"]) != 0
    assert not (tmp_path / "b").exists()
    with pytest.raises(SystemExit) as exc:  # argparse: not one of the choices
        main(["refine", str(ckpt), str(tmp_path / "c"), *common, "--quantize", "Q4_K"])
    assert exc.value.code != 0


def test_resume_state_keeps_the_quant_reports() -> None:
    from dsnot_deploy.layerwise.driver import LayerReport
    from dsnot_deploy.layerwise.resume import _report_from_json, _report_to_json
    from dsnot_deploy.quant.report import QuantReport

    report = LayerReport(index=3, quant=[QuantReport("3.mlp.up_proj", "Q4_0", 0.02, 0.01, "gptq", 0.5)])
    back = _report_from_json(_report_to_json(report), {})
    assert back.quant == report.quant


def test_streamed_quantization_equals_in_memory(tiny, tmp_path: Path) -> None:

    prune = PruneConfig(refinement=Refinement.NONE, update=Update.NONE, pattern=SparsityPattern.unstructured(0.5))
    _refine(tiny, tmp_path / "mem", QuantizeConfig(type="Q4_0", head=False), prune)
    _refine(tiny, tmp_path / "str", QuantizeConfig(type="Q4_0", head=False), prune, stream=True)
    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "str")
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


@pytest.mark.parametrize("name", ["Q4_0", "Q5_0"])
def test_searched_scales_are_fp16_and_never_worse_than_ggml_rule(name: str) -> None:
    from dsnot_deploy.quant.lattice import block_scales, levels, search_scales

    lat = LATTICES[name]
    g = torch.Generator().manual_seed(7)
    block = torch.randn(64, 32, generator=g) * torch.rand(64, 1, generator=g)
    block[0] = 0.0  # an all-zero block (fully pruned) has scale 0
    weights = torch.rand(32, generator=g) * 5
    found = search_scales(block, weights, lat)
    assert found[0] == 0
    assert torch.equal(found, found.to(torch.float16).to(torch.float32))

    def err(scale: torch.Tensor) -> torch.Tensor:
        return ((block - levels(block, scale, lat) * scale.unsqueeze(1)) ** 2 * weights).sum(dim=1)

    assert (err(found) <= err(block_scales(block, lat)) + 1e-12).all()
    assert (err(found) < err(block_scales(block, lat))).float().mean() > 0.5  # the search finds better ones


@pytest.mark.parametrize("preset,hidden,intermediate", [("SPARSE_Q4", 64, 128), ("SPARSE_Q5", 256, 512)])
def test_preset_targets_follow_the_preset_plan_and_export_copies_them(tmp_path: Path, preset: str, hidden: int,
                                                                      intermediate: int) -> None:
    """Each Linear on the lattice of the type the preset plans for it; llama.cpp (which writes presets)
    copies those tensors, so the file holds the checkpoint's values bit for bit; a tensor planned at Q6_K
    (rows of 256) is left in float for llama.cpp."""
    from safetensors.torch import load_file

    from converters.gguf_export import ExportConfig, export_gguf
    from dsnot_deploy.quant.targets import lattice_for

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama", hidden_size=hidden,
                                intermediate_size=intermediate, num_attention_heads=hidden // 16)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    manifest = refine(RefineJob(model=str(ckpt), outdir=tmp_path / "q", prune=PruneConfig(),
                                calibration=CalibrationConfig(str(calib), 4, 32, 0), progress=False,
                                quantize=QuantizeConfig(type=preset, scales="search")))
    placed = {q["name"]: q["type"] for q in manifest["quantize"]["linears"]}
    weights = load_file(tmp_path / "q" / "model.safetensors")
    expected_float = 0
    for lin in manifest["linears"]:
        layer, sub = lin["name"].split(".", 1)
        w = weights[f"model.layers.{layer}.{sub}.weight"]
        lat = lattice_for(preset, lin["name"], w.shape[1])
        if lat is None:
            assert lin["name"] not in placed  # Q6_K: no lattice here
            expected_float += 1
        else:
            assert placed[lin["name"]] == lat.name and is_on_lattice(w, lat)
    assert expected_float == (2 * 2 if hidden == 256 else 0)  # attn_v and ffn_down of 2 layers at Q6_K
    assert set(placed.values()) == ({"Q5_0"} if hidden == 256 else {"Q4_0", "Q8_0"})
    report = export_gguf(tmp_path / "q", tmp_path / "q.gguf", ExportConfig(qtype=preset, progress=False))
    zeros = report["zeros"]
    assert zeros["tensors"] == len(manifest["linears"])
    assert zeros["tensors_written_exactly"] == len(placed)


def test_head_sweep_puts_the_tied_embedding_on_the_lattice_and_export_writes_it_exactly(tmp_path: Path) -> None:
    import gguf
    from gguf import quants
    from safetensors.torch import load_file

    from converters.gguf_export import ExportConfig, export_gguf

    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama", tie_word_embeddings=True)
    calib = tmp_path / "calib.txt"
    calib.write_text(TEXT)
    manifest = refine(RefineJob(model=str(ckpt), outdir=tmp_path / "q", prune=PruneConfig(),
                                calibration=CalibrationConfig(str(calib), 4, 32, 0), progress=False,
                                quantize=QuantizeConfig(type="Q4_0", head=True)))
    head = manifest["quantize"]["head"]
    assert head["name"] == "lm_head" and head["type"] == "Q4_0"
    assert min(head["error_sweep"], head["error_rtn"]) <= head["error_rtn"]
    tensors = load_file(tmp_path / "q" / "model.safetensors")
    emb = tensors["model.embed_tokens.weight"]
    assert "lm_head.weight" not in tensors or torch.equal(tensors["lm_head.weight"], emb)
    assert is_on_lattice(emb, LATTICES["Q4_0"])
    export_gguf(tmp_path / "q", tmp_path / "q.gguf", ExportConfig(qtype="Q4_0", progress=False))
    t = next(t for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors if t.name == "token_embd.weight")
    written = quants.dequantize(t.data, t.tensor_type).reshape(emb.shape)
    assert np.array_equal((written + np.float32(0)).view(np.uint32), (emb.numpy() + np.float32(0)).view(np.uint32))
    plain = refine(RefineJob(model=str(ckpt), outdir=tmp_path / "p", prune=PruneConfig(),
                             calibration=CalibrationConfig(str(calib), 4, 32, 0), progress=False,
                             quantize=QuantizeConfig(type="Q4_0", head=False)))
    assert "head" not in plain["quantize"]
    assert torch.equal(load_file(tmp_path / "p" / "model.safetensors")["model.embed_tokens.weight"],
                       load_file(ckpt / "model.safetensors")["model.embed_tokens.weight"])
