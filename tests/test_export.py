"""`export`: tiny checkpoints of every architecture in the table, written to GGUF and run in llama.cpp."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, MistralConfig, MistralForCausalLM

from converters import gguf_export
from converters.gguf_export import ExportConfig, export_gguf, report_path
from converters.gguf_tokenizer import tokenization_mismatches, usable_probes
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UnsupportedModelError
from dsnot_deploy.evaluation.llamacpp_runtime import isolated_logits
from tests.tiny_models import ARCHS, make_tiny_tokenizer, save_tiny_checkpoint

llama_cpp = pytest.importorskip("llama_cpp")

PROMPT = [1, 5, 9, 20, 33, 40, 50, 60, 70, 80, 90, 100, 17, 18, 19, 21, 44, 45, 46, 47]  # 20 > gemma3 window 8
ZERO_KEEPING = ("F16", "BF16", "Q8_0", "Q4_0", "Q5_0")


def _save_mistral(outdir: Path) -> Path:
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=None,
                        max_position_embeddings=256, attn_implementation="eager")
    MistralForCausalLM(cfg).eval().save_pretrained(outdir)
    make_tiny_tokenizer().save_pretrained(outdir)
    return outdir


def _checkpoint(root: Path, arch: str, **overrides) -> Path:
    if arch == "mistral":
        return _save_mistral(root / arch)
    return save_tiny_checkpoint(root / arch, arch=arch, **overrides)


def _torch_logits(ckpt: Path, ids: list[int], state: dict[str, torch.Tensor] | None = None) -> np.ndarray:
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    if state is not None:
        model.load_state_dict(state, strict=False)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].double().numpy()


def _llamacpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    """In a llama.cpp child process: a type that crashes llama.cpp fails the test instead of the run."""
    return isolated_logits(path, ids, n_ctx=64).astype(np.float64)


def _sparsify(ckpt: Path, fraction: float = 0.5, seed: int = 0) -> None:
    """Zero `fraction` of every decoder Linear in place (random positions; rows keep other values)."""
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            t[torch.rand(t.shape, generator=gen) < fraction] = 0.0
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def sparse_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("sparse") / "llama", arch="llama")
    _sparsify(ckpt)
    return ckpt


@pytest.mark.parametrize("arch", [*ARCHS, "mistral"])
def test_f32_export_runs_in_llamacpp_like_torch(arch: str, tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, arch)
    out = tmp_path / "model.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype="F32", progress=False))
    ref = _torch_logits(ckpt, PROMPT)
    got = _llamacpp_logits(out, PROMPT)
    assert np.abs(got - ref).max() < 2e-3, f"{arch}: max |diff| {np.abs(got - ref).max()}"
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert report["tokenizer"]["probe_mismatches"] == 0 and report["tokenizer"]["probe_texts"] >= 3
    assert json.loads(report_path(out).read_text())["type"] == "F32"


def test_llama_without_qk_permutation_gives_wrong_logits(tmp_path: Path, monkeypatch) -> None:
    """The permutation test above can fail: skipping the permutation breaks the logits."""
    ckpt = _checkpoint(tmp_path, "llama")
    ref = _torch_logits(ckpt, PROMPT)
    good = tmp_path / "good.gguf"
    export_gguf(ckpt, good, ExportConfig(qtype="F32", progress=False))
    spec = gguf_export.find_arch("LlamaForCausalLM")
    monkeypatch.setattr(gguf_export, "find_arch", lambda name: type(spec)(**{**spec.__dict__, "permute_qk": False}))
    bad = tmp_path / "bad.gguf"
    export_gguf(ckpt, bad, ExportConfig(qtype="F32", progress=False))
    good_diff = np.abs(_llamacpp_logits(good, PROMPT) - ref).max()
    bad_diff = np.abs(_llamacpp_logits(bad, PROMPT) - ref).max()
    assert bad_diff > 10 * good_diff, (bad_diff, good_diff)


def _inverse_permutation(rows: int, n_head: int) -> np.ndarray:
    forward = np.arange(rows).reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(-1)
    return np.argsort(forward)


def _dequantized_state(path: Path, ckpt: Path) -> dict[str, torch.Tensor]:
    """The GGUF's weights back in HF names and layout (undoing the Q/K permutation)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    hf_of = {}
    for name in json.loads(json.dumps(list(gguf_export.open_checkpoint(ckpt).tensors))):
        mapped = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg["num_hidden_layers"]).get_name(
            name, try_suffixes=(".weight", ".bias"))
        hf_of[mapped] = name
    state = {}
    for t in gguf.GGUFReader(path).tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        hf = hf_of[t.name]
        if hf.endswith("q_proj.weight"):
            values = values[_inverse_permutation(values.shape[0], cfg["num_attention_heads"])]
        if hf.endswith("k_proj.weight"):
            values = values[_inverse_permutation(values.shape[0], cfg["num_key_value_heads"])]
        state[hf] = torch.from_numpy(values.copy())
    return state


@pytest.mark.parametrize("qtype,tol", [("Q8_0", 0.02), ("Q4_0", 0.05), ("SPARSE_Q4", 0.05)])
def test_quantized_file_runs_like_its_dequantized_weights(qtype: str, tol: float, tmp_path: Path) -> None:
    """llama.cpp on the quantized file == torch on the same weights dequantized, up to activation rounding."""
    ckpt = _checkpoint(tmp_path, "llama")
    out = tmp_path / "model.gguf"
    export_gguf(ckpt, out, ExportConfig(qtype=qtype, progress=False))
    got = _llamacpp_logits(out, PROMPT)
    same_weights = _torch_logits(ckpt, PROMPT, _dequantized_state(out, ckpt))
    original = _torch_logits(ckpt, PROMPT)
    noise = np.abs(got - same_weights).max()
    assert noise < tol, f"{qtype}: llama.cpp vs dequantized torch max |diff| {noise}"
    assert noise < np.abs(got - original).max()  # quantization moved the logits more than runtime noise


@pytest.mark.parametrize("qtype", ZERO_KEEPING)
def test_zero_keeping_types_keep_every_pruned_zero(qtype: str, sparse_llama: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{qtype}.gguf"
    report = export_gguf(sparse_llama, out, ExportConfig(qtype=qtype, progress=False))
    z = report["zeros"]
    assert report["sparse_input"] is True
    assert z["tensors"] == 14 and z["zeros_in_checkpoint"] > 0.4 * sum(t["size"] for t in report["zeros_per_tensor"])
    assert z["zeros_kept"] == z["zeros_in_checkpoint"] and z["kept_fraction"] == 1.0
    # independent recount on the file: each block type stores exact zeros as zeros
    reader = gguf.GGUFReader(out)
    t = next(t for t in reader.tensors if t.name == "blk.0.ffn_up.weight")
    written = gguf.quants.dequantize(t.data, t.tensor_type)
    entry = next(z for z in report["zeros_per_tensor"] if z["name"] == "blk.0.ffn_up.weight")
    assert int((written == 0).sum()) == entry["zeros_source"] + entry["zeros_added"] > 0
    assert t.tensor_type.name == qtype


def test_k_quant_presets_keep_zeros_where_blocks_fit(tmp_path: Path) -> None:
    """Q6_K needs rows of 256: a wider tiny model gets real Q6_K tensors, and they keep every zero."""
    ckpt = save_tiny_checkpoint(tmp_path / "wide", arch="llama", hidden_size=256, intermediate_size=512,
                                head_dim=64)
    _sparsify(ckpt, 0.5)
    for qtype in ("Q6_K", "SPARSE_Q4", "SPARSE_Q3"):
        report = export_gguf(ckpt, tmp_path / f"{qtype}.gguf", ExportConfig(qtype=qtype, progress=False))
        assert report["zeros"]["kept_fraction"] == 1.0, qtype
    assert "Q6_K" in report["tensor_types"] and "Q3_K" in report["tensor_types"]


def test_zero_losing_type_is_refused_for_sparse_checkpoint(sparse_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "q4km.gguf"
    assert main(["export", str(sparse_llama), str(out), "--type", "Q4_K_M", "-q"]) == 2
    err = capsys.readouterr().err
    assert "does not keep exact zeros" in err and "--allow-zero-loss" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []
    assert main(["export", str(sparse_llama), str(out), "--type", "Q4_1", "--allow-zero-loss", "-q"]) == 0
    report = json.loads(report_path(out).read_text())
    assert report["zeros"]["kept_fraction"] < 0.9  # the refusal was justified: Q4_1 loses most zeros


def test_dense_checkpoint_may_use_any_type(tmp_path: Path) -> None:
    ckpt = _checkpoint(tmp_path, "qwen2")
    report = export_gguf(ckpt, tmp_path / "m.gguf", ExportConfig(qtype="Q4_K_M", progress=False))
    assert report["sparse_input"] is False and report["file_bytes"] > 0


def test_metadata_keys_and_provenance(tmp_path: Path) -> None:
    from dsnot_deploy.algorithms.config import PruneConfig, SparsityPattern
    from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob, refine

    ckpt = _checkpoint(tmp_path, "llama")
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"the quick brown fox number {i} jumps over the lazy dog." for i in range(300)))
    sparse = tmp_path / "sparse"
    refine(RefineJob(model=str(ckpt), outdir=sparse, prune=PruneConfig(pattern=SparsityPattern.parse("2:4")),
                     calibration=CalibrationConfig(str(text), 4, 32, 0), progress=False))
    out = tmp_path / "m.gguf"
    export_gguf(sparse, out, ExportConfig(qtype="Q8_0", progress=False))
    fields = gguf.GGUFReader(out).fields
    for key in ("general.architecture", "general.file_type", "general.quantization_version", "llama.block_count",
                "llama.context_length", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.attention.head_count_kv", "llama.rope.freq_base",
                "llama.attention.layer_norm_rms_epsilon", "llama.rope.dimension_count", "llama.vocab_size",
                "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.merges",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                "dsnot.method", "dsnot.refinement", "dsnot.pattern", "dsnot.sparsity.achieved",
                "dsnot.sparsity.per_layer", "dsnot.calibration.nsamples", "dsnot.tool_version"):
        assert key in fields, key
    assert fields["dsnot.pattern"].contents() == "2:4"
    assert fields["dsnot.method"].contents() == "wanda"
    assert fields["dsnot.allocation"].contents() == "uniform"
    assert fields["general.file_type"].contents() == int(gguf.LlamaFileType.MOSTLY_Q8_0)
    assert len(fields["dsnot.sparsity.per_layer"].contents()) == 2
    assert fields["dsnot.sparsity.achieved"].contents() == pytest.approx(0.5)


def _rich_tokenizer():
    """Byte-level BPE (GPT-2 splitting, all 256 bytes) trained on the probe texts: merges across digits,
    spaces and punctuation, so pre-tokenizers that split differently tokenize differently."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from converters.gguf_tokenizer import PROBE_TEXTS

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    core.train_from_iterator(list(PROBE_TEXTS) * 3, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>")


def test_tokenization_check_can_fail_and_detection_finds_a_match(tmp_path: Path) -> None:
    """A pre-tokenizer that groups digits by three disagrees with GPT-2's on the probes; detection finds one
    that agrees and llama.cpp then tokenizes every probe like HF."""
    from converters.gguf_tokenizer import load_hf_tokenizer

    ckpt = save_tiny_checkpoint(tmp_path / "rich", arch="llama", tokenizer=_rich_tokenizer(), vocab_size=640)
    tok = load_hf_tokenizer(ckpt)
    wrong = tmp_path / "wrong.gguf"
    export_gguf(ckpt, wrong, ExportConfig(qtype="F32", progress=False, tokenizer_pre="llama-bpe"))
    assert tokenization_mismatches(wrong, tok, usable_probes(tok))
    right = tmp_path / "right.gguf"
    report = export_gguf(ckpt, right, ExportConfig(qtype="F32", progress=False))
    assert report["tokenizer"]["probe_mismatches"] == 0 and report["tokenizer"]["probe_texts"] >= 10
    assert report["tokenizer"]["pre"] == "gpt-2"


def _sentencepiece_style_tokenizer():
    """Llama-2-style tokenizer.json: BPE over '▁'-joined text with byte fallback (<0x00>..<0xFF> in the
    model vocab), BOS added by the post-processor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    from converters.gguf_tokenizer import PROBE_TEXTS

    def normalizer():
        return normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])

    base = Tokenizer(models.BPE(unk_token="<unk>"))
    base.normalizer = normalizer()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    base.train_from_iterator([t for t in PROBE_TEXTS if t.isascii()] * 3, trainer=trainer)
    trained = json.loads(base.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"<0x{i:02X}>": 3 + i for i in range(256)}
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    core.normalizer = normalizer()
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                      decoders.Strip(" ", 1, 0)])
    core.add_special_tokens(["<unk>", "<s>", "</s>"])
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_sentencepiece_style_tokenizer_tokenizes_like_hf(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "spm", arch="llama", tokenizer=_sentencepiece_style_tokenizer(),
                                vocab_size=768)
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype="F32", progress=False))
    assert report["tokenizer"]["model"] == "llama" and report["tokenizer"]["pre"] is None
    assert report["tokenizer"]["probe_mismatches"] == 0 and report["tokenizer"]["probe_texts"] >= 10
    fields = gguf.GGUFReader(out).fields
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[3:259] == [int(gguf.TokenType.BYTE)] * 256 and types[1] == int(gguf.TokenType.CONTROL)
    assert fields["tokenizer.ggml.add_bos_token"].contents() is True
    ids = [1, *PROMPT[1:]]
    assert np.abs(_llamacpp_logits(out, ids) - _torch_logits(ckpt, ids)).max() < 2e-3


def test_unsupported_architecture_is_a_clear_error(tmp_path: Path, capsys) -> None:
    ckpt = _checkpoint(tmp_path, "llama")
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (ckpt / "config.json").write_text(json.dumps(cfg))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    assert main(["export", str(ckpt), str(out_dir / "m.gguf"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "GPT2LMHeadModel" in err and "supported: LlamaForCausalLM" in err
    assert list(out_dir.iterdir()) == []


def test_rows_not_divisible_by_block_fall_back_to_f16(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "odd", arch="llama", hidden_size=80, head_dim=16)
    _sparsify(ckpt)
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype="Q8_0", progress=False))
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_output.weight"] == "Q8_0"  # 80 vs 64 cols
    assert "blk.0.attn_q.weight" in report["fallback_tensors"]
    assert report["zeros"]["kept_fraction"] == 1.0
    got, ref = _llamacpp_logits(out, PROMPT), _torch_logits(ckpt, PROMPT)
    assert np.abs(got - ref).max() < 0.05


def test_gemma3_query_scale_mismatch_is_refused(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "g", arch="gemma3", query_pre_attn_scalar=256)
    with pytest.raises(UnsupportedModelError, match="query_pre_attn_scalar"):
        export_gguf(ckpt, tmp_path / "m.gguf", ExportConfig(qtype="F32", progress=False))
    assert not (tmp_path / "m.gguf").exists()


def test_llama3_rope_scaling_matches_torch(tmp_path: Path) -> None:
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    ckpt = save_tiny_checkpoint(tmp_path / "l3", arch="llama", rope_parameters=rope, max_position_embeddings=128)
    out = tmp_path / "m.gguf"
    export_gguf(ckpt, out, ExportConfig(qtype="F32", progress=False))
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out).tensors}
    assert np.abs(_llamacpp_logits(out, PROMPT) - _torch_logits(ckpt, PROMPT)).max() < 2e-3


def test_failure_midway_leaves_nothing(sparse_llama: Path, tmp_path: Path, monkeypatch) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"previous file")
    calls = {"n": 0}
    real = gguf_export._encode

    def failing(values, qtype, exact=False):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("disk on fire")
        return real(values, qtype, exact)

    monkeypatch.setattr(gguf_export, "_encode", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_gguf(sparse_llama, out, ExportConfig(qtype="Q8_0", progress=False, force=True))
    assert out.read_bytes() == b"previous file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf"]


def test_existing_output_needs_force(sparse_llama: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert main(["export", str(sparse_llama), str(out), "-q"]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep me"
    assert main(["export", str(sparse_llama), str(out), "--force", "-q"]) == 0
    assert out.read_bytes()[:4] == b"GGUF"


def _write_imatrix_gguf(path: Path, means: dict[str, np.ndarray], count: float = 40.0) -> None:
    """A llama.cpp imatrix file: per weight, '<name>.in_sum2' (sum of x^2) and '<name>.counts'."""
    w = gguf.GGUFWriter(path, "imatrix")
    w.add_string("general.type", "imatrix")
    for name, mean in means.items():
        w.add_tensor(f"{name}.in_sum2", (mean * count).astype(np.float32).reshape(1, -1))
        w.add_tensor(f"{name}.counts", np.array([[count]], dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_importance_matrix_from_llamacpp_file_and_from_our_statistics(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    from converters.imatrix import read_imatrix_file

    ckpt = save_tiny_checkpoint(tmp_path / "wide", arch="llama", hidden_size=256, intermediate_size=512, head_dim=64)
    _sparsify(ckpt, 0.5)
    rng = np.random.default_rng(0)
    modules = {name[: -len(".weight")]: shape for name, shape in
               ((n, r.shape) for n, r in gguf_export.open_checkpoint(ckpt).tensors.items())
               if ".layers." in name and name.endswith("proj.weight")}
    stats = {m: rng.gamma(0.3, 1.0, size=shape[1]).astype(np.float32) for m, shape in modules.items()}
    mapper = gguf_export._name_mapper(gguf_export.find_arch("LlamaForCausalLM"), 2)
    imatrix_file = tmp_path / "imatrix.gguf"
    _write_imatrix_gguf(imatrix_file, {mapper(m + ".weight"): v for m, v in stats.items()})
    read_back = read_imatrix_file(imatrix_file)
    assert len(read_back) == 14 and all(np.allclose(read_back[mapper(m + ".weight")], v) for m, v in stats.items())

    plain = export_gguf(ckpt, tmp_path / "plain.gguf", ExportConfig(qtype="SPARSE_Q4", imatrix="none", progress=False))
    from_file = export_gguf(ckpt, tmp_path / "file.gguf",
                            ExportConfig(qtype="SPARSE_Q4", imatrix=str(imatrix_file), progress=False))
    save_file(stats, str(ckpt / "calibration_stats.safetensors"))
    auto = export_gguf(ckpt, tmp_path / "auto.gguf", ExportConfig(qtype="SPARSE_Q4", progress=False))
    assert plain["imatrix"]["entries"] == 0 and from_file["imatrix"]["entries"] == auto["imatrix"]["entries"] == 14
    assert auto["imatrix"]["source"] == "calibration_stats.safetensors"
    for report in (plain, from_file, auto):
        assert report["zeros"]["kept_fraction"] == 1.0

    def q_bytes(path: Path) -> bytes:
        return next(t for t in gguf.GGUFReader(path).tensors if t.name == "blk.0.attn_q.weight").data.tobytes()

    # the importance matrix was used (sum/count round trips to within an ulp, so the two routes may differ
    # in a rounding tie; both differ from the plain quantization)
    assert q_bytes(tmp_path / "file.gguf") != q_bytes(tmp_path / "plain.gguf")
    assert q_bytes(tmp_path / "auto.gguf") != q_bytes(tmp_path / "plain.gguf")
