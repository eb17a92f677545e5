"""`export` plans every tensor's type, says which tensors fall back to what and why, and checks the file.

SPARSE_Q3's Q3_K (and the presets' Q6_K) need rows that are a multiple of 256; the tiny models here are 64
wide, so they fall back to zero-keeping types chosen per row width, and a 256-wide model gets real Q3_K.
"""

from __future__ import annotations

import logging
from pathlib import Path

import gguf
import pytest
import torch

from converters import gguf_types
from converters.gguf_export import ExportConfig, export_gguf
from converters.gguf_types import (
    OUTPUT_TYPES,
    ZERO_KEEPING,
    plan_tensor_type,
    summarize_fallbacks,
    zero_keeping_fallback,
)
from tests.tiny_models import save_tiny_checkpoint

Q = gguf.GGMLQuantizationType


def _sparsify(ckpt: Path, fraction: float = 0.5) -> None:
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if ".layers." in name and name.endswith("proj.weight"):
            t[torch.rand(t.shape, generator=gen) < fraction] = 0.0
    save_file(tensors, path, metadata={"format": "pt"})


def _file_types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("intended,ncols,expected", [
    (Q.Q3_K, 576, Q.Q4_0), (Q.Q3_K, 512, Q.Q3_K), (Q.Q3_K, 100, Q.F16), (Q.Q6_K, 576, Q.Q8_0),
    (Q.Q6_K, 1536, Q.Q6_K), (Q.Q4_0, 80, Q.F16), (Q.Q5_0, 96, Q.Q5_0),
])
def test_plan_falls_back_per_row_width_to_a_zero_keeping_type(intended: Q, ncols: int, expected: Q) -> None:
    chosen = intended if ncols % gguf.GGML_QUANT_SIZES[intended][0] == 0 else zero_keeping_fallback(intended, ncols)
    assert chosen == expected and chosen in ZERO_KEEPING


def test_sparse_presets_plan_only_zero_keeping_types_for_any_width() -> None:
    for preset in ("SPARSE_Q3", "SPARSE_Q4", "SPARSE_Q5", "Q6_K"):
        otype = OUTPUT_TYPES[preset]
        for name in ("blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.ffn_down.weight", "token_embd.weight"):
            for ncols in (64, 100, 256, 576, 1536, 2048, 8192 + 32):
                choice = plan_tensor_type(otype, name, ncols)
                assert Q[choice.written] in ZERO_KEEPING
                assert ncols % gguf.GGML_QUANT_SIZES[Q[choice.written]][0] == 0
                assert choice.fallback == bool(choice.reason)
    q3 = plan_tensor_type(OUTPUT_TYPES["SPARSE_Q3"], "blk.3.attn_q.weight", 576)
    assert (q3.intended, q3.written) == ("Q3_K", "Q4_0")
    assert summarize_fallbacks([q3] * 150) == ["150 tensors Q3_K -> Q4_0: rows 576 not a multiple of 256 "
                                               "(Q3_K block size)"]


def test_sparse_q3_on_narrow_rows_lists_its_fallbacks_and_the_file_matches(tmp_path: Path, caplog) -> None:
    pytest.importorskip("llama_cpp")
    ckpt = save_tiny_checkpoint(tmp_path / "narrow", arch="llama")  # hidden 64, intermediate 128
    _sparsify(ckpt)
    out = tmp_path / "s3.gguf"
    native = logging.getLogger("llama_cpp.native")
    before = (native.level, native.propagate, list(native.handlers))
    with caplog.at_level(logging.WARNING, logger="converters.gguf_export"):
        report = export_gguf(ckpt, out, ExportConfig(qtype="SPARSE_Q3", progress=False))
    assert (native.level, native.propagate, list(native.handlers)) == before
    fallbacks = {f["name"]: f for f in report["fallbacks"]}
    assert set(report["fallback_tensors"]) == set(fallbacks)
    assert fallbacks["blk.0.attn_q.weight"] == {
        "name": "blk.0.attn_q.weight", "intended": "Q3_K", "written": "Q4_0",
        "reason": "rows 64 not a multiple of 256 (Q3_K block size)", "decided_by": "dsnot-deploy"}
    assert fallbacks["blk.1.ffn_down.weight"]["intended"] == "Q6_K"
    assert fallbacks["blk.1.ffn_down.weight"]["written"] == "Q8_0"
    assert "rows 128" in fallbacks["blk.1.ffn_down.weight"]["reason"]
    # 2 layers x (q, k, o, gate, up) Q3_K -> Q4_0 and x (v, down) Q6_K -> Q8_0; embeddings/output fit Q8_0
    assert len(fallbacks) == 14 and "token_embd.weight" not in fallbacks
    written = _file_types(out)
    assert all(written[name] == f["written"] for name, f in fallbacks.items())
    assert report["type_check"]["mismatches"] == [] and report["type_check"]["chosen_by_llamacpp"] == 0
    assert report["type_check"]["planned"] == len(written)
    assert report["tensor_types"] == {"F32": 5, "Q4_0": 10, "Q8_0": 6}
    assert report["zeros"]["kept_fraction"] == 1.0 and report["zeros"]["zeros_in_checkpoint"] > 0
    messages = [r.getMessage() for r in caplog.records]
    assert "SPARSE_Q3: 10 tensors Q3_K -> Q4_0: rows 64 not a multiple of 256 (Q3_K block size)" in messages


def test_sparse_q3_on_rows_of_256_writes_q3_k_without_fallback(tmp_path: Path) -> None:
    pytest.importorskip("llama_cpp")
    ckpt = save_tiny_checkpoint(tmp_path / "wide", arch="llama", hidden_size=256, intermediate_size=512,
                                head_dim=64)
    _sparsify(ckpt)
    out = tmp_path / "s3.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype="SPARSE_Q3", progress=False))
    assert report["fallbacks"] == [] and report["fallback_tensors"] == []
    written = _file_types(out)
    assert written["blk.0.attn_q.weight"] == "Q3_K" and written["blk.0.ffn_up.weight"] == "Q3_K"
    assert written["blk.0.attn_v.weight"] == "Q6_K" and written["blk.1.ffn_down.weight"] == "Q6_K"
    assert written["token_embd.weight"] == "Q8_0"
    assert report["tensor_types"] == {"F32": 5, "Q3_K": 10, "Q6_K": 4, "Q8_0": 2}
    assert report["type_check"]["mismatches"] == []
    assert report["zeros"]["kept_fraction"] == 1.0


def test_a_written_type_that_differs_from_the_plan_is_reported(tmp_path: Path, monkeypatch, caplog) -> None:
    """If llama.cpp writes another type than planned (here: it is told another one), the report says so."""
    pytest.importorskip("llama_cpp")
    ckpt = save_tiny_checkpoint(tmp_path / "narrow", arch="llama")
    real = gguf_types.exact_overrides

    def wrong(choices):
        return tuple((p, Q.Q8_0 if "blk\\.0\\.attn_q" in p else t) for p, t in real(choices))

    monkeypatch.setattr(gguf_types, "exact_overrides", wrong)
    with caplog.at_level(logging.WARNING, logger="converters.gguf_export"):
        report = export_gguf(ckpt, tmp_path / "m.gguf", ExportConfig(qtype="SPARSE_Q3", progress=False))
    [mismatch] = report["type_check"]["mismatches"]
    assert mismatch["name"] == "blk.0.attn_q.weight" and mismatch["written"] == "Q8_0"
    assert mismatch["intended"] == "Q3_K" and "planned Q4_0, llama.cpp wrote Q8_0" in mismatch["reason"]
    assert mismatch in report["fallbacks"]
    assert any("written in another type than planned" in r.getMessage() for r in caplog.records)


def test_llamacpp_mix_fallbacks_are_reported_from_its_log(tmp_path: Path) -> None:
    """Q4_K_M stays llama.cpp's own mix; what llama.cpp fell back to on 64-wide rows is now in the report."""
    pytest.importorskip("llama_cpp")
    ckpt = save_tiny_checkpoint(tmp_path / "narrow", arch="llama")
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype="Q4_K_M", progress=False))
    fallbacks = {f["name"]: f for f in report["fallbacks"]}
    assert fallbacks["blk.0.attn_q.weight"]["intended"] == "Q4_K"
    assert fallbacks["blk.0.attn_q.weight"]["written"] == "Q5_0"
    assert all(f["decided_by"] == "llama.cpp" for f in fallbacks.values())
    written = _file_types(out)
    assert all(written[name] == f["written"] for name, f in fallbacks.items())
    assert report["type_check"]["chosen_by_llamacpp"] == 16 and report["type_check"]["mismatches"] == []
