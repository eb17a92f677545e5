"""`validate`: llama.cpp perplexity, KLD and top-1 on tiny GGUFs, checked against independent loops;
the gate's exit codes; bad inputs; the dense export cache; the reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
gguf_export = pytest.importorskip("converters.gguf_export")

from converters.gguf_info import read_gguf_info  # noqa: E402
from converters.llamacpp_loader import open_llama  # noqa: E402
from dsnot_deploy.cli import main  # noqa: E402
from dsnot_deploy.errors import UserInputError  # noqa: E402
from dsnot_deploy.evaluation import dense_cache, logit_metrics  # noqa: E402
from dsnot_deploy.evaluation.gate import GateConfig  # noqa: E402
from dsnot_deploy.evaluation.llamacpp_runtime import GGUFModel, ScoringPlan  # noqa: E402
from dsnot_deploy.evaluation.logit_metrics import compare_logits  # noqa: E402
from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp, perplexity_paper  # noqa: E402
from dsnot_deploy.evaluation.validate import ValidateConfig, run_validation  # noqa: E402
from tests.helpers_tokenizer import make_tiny_tokenizer  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

TEXT = " ".join(
    f"Sentence number {i} tells the quick brown fox to jump over the lazy dog; the rest are zero." for i in range(120)
)
CTX = 64


def _export(ckpt: Path, out: Path) -> Path:
    gguf_export.export_gguf(ckpt, out, gguf_export.ExportConfig(qtype="F32", progress=False))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny Llama whose vocab adds BOS (so BOS replacement is exercised), its 50% sparse version
    (refined by the real `refine` command), both as F32 GGUFs; a GGUF with another vocabulary."""
    root = tmp_path_factory.mktemp("validate")
    text = root / "text.txt"
    text.write_text(TEXT)
    ckpt = save_tiny_checkpoint(root / "dense", arch="llama", tokenizer=make_tiny_tokenizer(), vocab_size=320,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    assert main(["refine", str(ckpt), str(root / "sparse"), "--calib", str(text), "--nsamples", "4",
                 "--seqlen", "32", "--sparsity", "0.5", "-q"]) == 0
    other = save_tiny_checkpoint(root / "other", arch="llama")  # tests.tiny_models' own tokenizer
    return {
        "root": root, "text": text, "dense_ckpt": ckpt, "sparse_ckpt": root / "sparse",
        "dense": _export(ckpt, root / "dense.gguf"),
        "sparse": _export(root / "sparse", root / "sparse.gguf"),
        "other": _export(other, root / "other.gguf"),
    }


def _run(sparse: Path, dense: Path | str, text: Path, **kw):
    kw.setdefault("ctx", CTX)
    kw.setdefault("threads", 1)  # tiny models: one thread is fastest, and robust on a busy machine
    return run_validation(ValidateConfig(sparse=sparse, dense=str(dense), text=str(text), progress=False, **kw))


def _reference_logits(path: Path, text: str, ctx: int, protocol: str) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Independent of llamacpp_runtime: llama-cpp-python's high-level API with every logit kept
    (the documented loop: tokenize with BOS, BOS first in every chunk, reset, eval, scores)."""
    llm = open_llama(path, n_ctx=ctx, n_threads=1, logits_all=True)
    try:
        ids = llm.tokenize(text.encode(), add_bos=True)
        first = ctx // 2 if protocol == "llamacpp" else 0
        add_bos = ids[0] == llm.token_bos()
        rows, targets = [], []
        for c in range(len(ids) // ctx):
            chunk = list(ids[c * ctx : (c + 1) * ctx])
            targets.append(np.array(chunk[first + 1 :]))
            if add_bos and protocol == "llamacpp":
                chunk[0] = llm.token_bos()
            llm.reset()
            llm.eval(chunk)
            rows.append(np.array(llm.scores[first : ctx - 1], dtype=np.float64))
        return rows, targets
    finally:
        llm.close()


def _hand_rolled_ppl(rows: list[np.ndarray], targets: list[np.ndarray]) -> float:
    nll, n = 0.0, 0
    for chunk_rows, chunk_targets in zip(rows, targets):
        for row, y in zip(chunk_rows, chunk_targets):
            m = max(row)
            nll += m + math.log(sum(math.exp(x - m) for x in row)) - row[y]
            n += 1
    return math.exp(nll / n)


def test_llamacpp_perplexity_equals_a_hand_rolled_loop(tiny) -> None:
    result, _ = _run(tiny["sparse"], tiny["dense"], tiny["text"])
    for side, path in (("dense", tiny["dense"]), ("sparse", tiny["sparse"])):
        rows, targets = _reference_logits(path, TEXT, CTX, "llamacpp")
        assert len(rows) == result.n_chunks >= 4
        assert getattr(result, side).ppl == pytest.approx(_hand_rolled_ppl(rows, targets), rel=1e-6)
    assert result.bos_replacement == 0 and result.scored_per_chunk == CTX - 1 - CTX // 2


def test_kld_and_top1_equal_an_independent_computation(tiny) -> None:
    result, _ = _run(tiny["sparse"], tiny["dense"], tiny["text"])
    dense_rows, _ = _reference_logits(tiny["dense"], TEXT, CTX, "llamacpp")
    sparse_rows, _ = _reference_logits(tiny["sparse"], TEXT, CTX, "llamacpp")
    kls, same = [], 0
    for d_chunk, s_chunk in zip(dense_rows, sparse_rows):
        for d, s in zip(d_chunk, s_chunk):
            pd = np.exp(d - d.max()) / np.exp(d - d.max()).sum()
            ps = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            kls.append(float(np.sum(pd * np.log(pd / ps))))
            same += int(np.argmax(d) == np.argmax(s))
    assert result.kld_mean == pytest.approx(np.mean(kls), rel=1e-6) and result.kld_mean > 1e-4
    assert result.top1 == pytest.approx(same / len(kls))
    assert result.kld_quantiles["max"] == pytest.approx(max(kls), rel=1e-6)
    assert result.ppl_ratio == pytest.approx(result.sparse.ppl / result.dense.ppl)


def test_a_model_against_itself_has_zero_kld_and_full_top1(tiny) -> None:
    result, _ = _run(tiny["sparse"], tiny["sparse"], tiny["text"], protocol="paper")
    assert result.kld_mean == 0.0 and result.kld_quantiles["max"] == 0.0
    assert result.top1 == 1.0 and result.ppl_ratio == 1.0 and result.ppl_increase == 0.0
    assert result.dense.per_chunk_ppl == result.sparse.per_chunk_ppl


@pytest.mark.parametrize("protocol", ["llamacpp", "paper"])
def test_same_positions_as_the_torch_protocols(tiny, protocol: str) -> None:
    """perplexity.py's torch implementation, fed llama.cpp's own logits for each chunk, gives the same
    number (same positions, same BOS handling), and the torch model itself agrees with the F32 GGUF."""
    result, _ = _run(tiny["sparse"], tiny["dense"], tiny["text"], protocol=protocol, checkpoint=tiny["sparse_ckpt"])
    llm = open_llama(tiny["sparse"], n_ctx=CTX, n_threads=1, logits_all=True)
    try:
        ids = torch.tensor(llm.tokenize(TEXT.encode(), add_bos=True))

        def llama_model(chunk: torch.Tensor) -> torch.Tensor:
            llm.reset()
            llm.eval(chunk[0].tolist())
            return torch.from_numpy(np.array(llm.scores[:CTX]))[None]  # (1, ctx, vocab)

        if protocol == "llamacpp":
            ref = perplexity_llamacpp(llama_model, ids, CTX, bos_id=int(ids[0]), progress=False)
        else:
            ref = perplexity_paper(llama_model, ids, CTX, progress=False)
    finally:
        llm.close()
    assert result.sparse.ppl == pytest.approx(ref.ppl, rel=1e-6)
    assert result.sparse.per_chunk_ppl == pytest.approx(ref.per_chunk_ppl, rel=1e-6)
    assert result.torch is not None and result.torch["n_scored"] == result.sparse.n_scored
    assert abs(result.torch["relative_difference"]) < 1e-4  # F32 GGUF vs float32 torch, same tokens


def test_compare_logits_blocks_equal_one_pass(monkeypatch) -> None:
    rng = np.random.default_rng(0)
    dense = rng.normal(size=(37, 50)).astype(np.float32) * 3
    sparse = dense + rng.normal(size=dense.shape).astype(np.float32)
    targets = rng.integers(0, 50, size=37)
    whole = compare_logits(dense, sparse, targets)
    monkeypatch.setattr(logit_metrics, "_BLOCK_ELEMENTS", 50 * 4)  # blocks of 4 rows
    blocked = compare_logits(dense, sparse, targets)
    assert blocked.nll_dense == pytest.approx(whole.nll_dense, rel=1e-12)
    assert blocked.nll_sparse == pytest.approx(whole.nll_sparse, rel=1e-12)
    np.testing.assert_allclose(blocked.kld, whole.kld, rtol=1e-12)
    assert blocked.top1_matches == whole.top1_matches
    logp_d = torch.log_softmax(torch.from_numpy(dense).double(), -1)
    logp_s = torch.log_softmax(torch.from_numpy(sparse).double(), -1)
    kl = (logp_d.exp() * (logp_d - logp_s)).sum(-1).numpy()
    np.testing.assert_allclose(whole.kld, kl, rtol=1e-9, atol=1e-12)
    assert whole.nll_dense == pytest.approx(-float(logp_d[torch.arange(37), torch.from_numpy(targets)].sum()))


def test_chunks_reuse_one_output_buffer(tiny) -> None:
    """Only the scored positions of the current chunk are held: every chunk's logits are a
    (scored, vocab) view of the same llama.cpp buffer, not an accumulation."""
    with GGUFModel(tiny["dense"], CTX, threads=1) as model:
        ids = model.tokenize(TEXT)
        plan = ScoringPlan.for_protocol("llamacpp", CTX, model.bos_id)
        addresses = set()
        for chunk in model.iter_chunks(ids, plan, max_chunks=3):
            assert chunk.logits.shape == (plan.scored_per_chunk, model.n_vocab)
            assert not chunk.logits.flags.owndata and not chunk.logits.flags.writeable
            addresses.add(chunk.logits.__array_interface__["data"][0])
        assert len(addresses) == 1


def test_gguf_info_reads_the_exporters_metadata(tiny) -> None:
    info = read_gguf_info(tiny["sparse"])
    assert info.file_type_name == "F32" and info.architecture == "llama" and info.block_count == 2
    per_layer = info.per_layer_sparsity
    assert per_layer is not None and len(per_layer) == 2 and all(0.45 < s < 0.55 for s in per_layer)
    assert info.metadata["dsnot.pattern"] == "unstructured"
    assert read_gguf_info(tiny["dense"]).vocab_fingerprint == info.vocab_fingerprint
    assert read_gguf_info(tiny["other"]).vocab_fingerprint != info.vocab_fingerprint


# --------------------------------------------------------------------------- CLI: gate and reports


def _cli(tiny, *extra: str) -> list[str]:
    return ["validate", str(tiny["sparse"]), "--dense", str(tiny["dense"]), "--text", str(tiny["text"]),
            "--ctx", str(CTX), "--threads", "1", "-q", *extra]


def test_gate_passes_with_exit_0_and_writes_reports(tiny, tmp_path: Path, capsys) -> None:
    out = tmp_path / "r"
    code = main(_cli(tiny, "--max-ppl-ratio", "1000", "--max-kld", "10", "--min-top1", "0", "--max-ppl-increase",
                     "1e6", "--json", f"{out}.json", "--markdown", f"{out}.md", "--plot", f"{out}.png"))
    printed = capsys.readouterr().out
    assert code == 0 and "gate passed: 4 threshold(s)" in printed
    report = json.loads(Path(f"{out}.json").read_text())
    assert report["gate"]["passed"] is True and len(report["gate"]["checks"]) == 4
    assert report["files"]["sparse_gguf"]["sha256"] == dense_cache.sha256_file(tiny["sparse"])
    assert report["files"]["text"]["sha256"] == dense_cache.sha256_file(tiny["text"])
    assert report["versions"]["llama-cpp-python"] and report["settings"]["ctx"] == CTX
    assert len(report["results"]["sparse"]["per_chunk_ppl"]) == report["results"]["n_chunks"]
    assert report["models"]["sparse"]["dsnot"]["dsnot.sparsity.per_layer"]
    assert "top-1 agreement" in Path(f"{out}.md").read_text()
    assert Path(f"{out}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


@pytest.mark.parametrize(
    ("option", "value", "name"),
    [("--max-kld", "0", "--max-kld"), ("--min-top1", "1", "--min-top1"), ("--max-ppl-ratio", "0.01", "--max-ppl-ratio"),
     ("--max-ppl-increase", "-1000", "--max-ppl-increase")],  # a random tiny model's sparse ppl can be the lower
)
def test_gate_fails_with_exit_1_saying_which_and_by_how_much(tiny, capsys, option: str, value: str, name: str) -> None:
    code = main(_cli(tiny, "--max-kld", "10", option, value))
    printed = capsys.readouterr().out
    assert code == 1
    failed = [line for line in printed.splitlines() if line.startswith("FAIL")]
    assert len(failed) == 1 and name in failed[0] and " by " in failed[0]
    assert "gate FAILED: 1 of" in printed and f"{name} by " in printed


def test_identical_files_pass_the_strictest_gate(tiny, capsys) -> None:
    code = main(["validate", str(tiny["dense"]), "--dense", str(tiny["dense"]), "--text", str(tiny["text"]),
                 "--ctx", str(CTX), "--threads", "1", "-q", "--max-kld", "0", "--min-top1", "1", "--max-ppl-ratio", "1"])
    assert code == 0, capsys.readouterr()


def test_dense_checkpoint_is_exported_once_and_cached(tiny, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first, ctx1 = _run(tiny["sparse"], tiny["dense_ckpt"], tiny["text"], cache_dir=cache, max_chunks=2)
    second, ctx2 = _run(tiny["sparse"], tiny["dense_ckpt"], tiny["text"], cache_dir=cache, max_chunks=2)
    direct, _ = _run(tiny["sparse"], tiny["dense"], tiny["text"], max_chunks=2)
    assert ctx1["dense_origin"]["cached"] is False and ctx2["dense_origin"]["cached"] is True
    assert [p.name for p in cache.iterdir()] == [Path(ctx1["dense_origin"]["cache"]).name]
    assert first.dense.ppl == second.dense.ppl == pytest.approx(direct.dense.ppl, rel=1e-9)
    assert ctx1["dense_origin"]["qtype"] == "F32"


@pytest.mark.parametrize(
    "case", ["missing", "not-gguf", "vocab", "short-text", "top1-range", "exists", "bad-ctx"],
)
def test_bad_inputs_exit_2(tiny, tmp_path: Path, capsys, case: str) -> None:
    args = _cli(tiny)
    if case == "missing":
        args[1] = str(tmp_path / "nope.gguf")
    elif case == "not-gguf":
        fake = tmp_path / "fake.gguf"
        fake.write_bytes(b"not a gguf at all")
        args[1] = str(fake)
    elif case == "vocab":
        args[3] = str(tiny["other"])
    elif case == "short-text":
        short = tmp_path / "short.txt"
        short.write_text("hello world")
        args[5] = str(short)
    elif case == "top1-range":
        args += ["--min-top1", "90"]
    elif case == "exists":
        (tmp_path / "r.json").write_text("{}")
        args += ["--json", str(tmp_path / "r.json")]
    elif case == "bad-ctx":
        args[7] = "2"
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    expected = {"missing": "no such file", "not-gguf": "b'GGUF'", "vocab": "vocabulary", "short-text": "one chunk",
                "top1-range": "fraction", "exists": "--force", "bad-ctx": "--ctx"}[case]
    assert expected in err


def test_gate_config_is_validated() -> None:
    with pytest.raises(UserInputError):
        GateConfig(max_ppl_ratio=0)
    with pytest.raises(UserInputError):
        GateConfig(max_kld=-1)
    assert GateConfig().empty and not GateConfig(min_top1=0.5).empty
