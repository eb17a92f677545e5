"""`refine-and-export` end to end on a tiny random model: refine -> export -> validate, reports, exit codes."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("converters.gguf_export")

from converters.gguf_info import read_gguf_info  # noqa: E402
from dsnot_deploy.cli import (  # noqa: E402
    build_parser,
    main,
    refine_and_export,  # noqa: E402
)
from tests.helpers_tokenizer import make_tiny_tokenizer  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

TEXT = " ".join(
    f"Sentence number {i} tells the quick brown fox to jump over the lazy dog; the rest are zero." for i in range(120)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("rae")
    ckpt = save_tiny_checkpoint(root / "dense", arch="llama", tokenizer=make_tiny_tokenizer(), vocab_size=320,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    text = root / "text.txt"
    text.write_text(TEXT)
    return ckpt, text


def _args(ckpt: Path, text: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return ["refine-and-export", str(ckpt), str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32",
            "--text", str(text), "--ctx", "64", "--max-chunks", "3", "--type", "F32", "--cache-dir", str(cache),
            "--threads", "1", "-q", *extra]


def test_end_to_end_writes_gguf_reports_and_checkpoint(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt, text = tiny
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "model.gguf"
    keep = tmp_path / "sparse-ckpt"
    code = main(_args(ckpt, text, out, tmp_path / "cache", "--sparsity", "0.6", "--keep-checkpoint", str(keep),
                      "--max-ppl-ratio", "100", "--min-top1", "0.01"))
    printed = capsys.readouterr().out
    assert code == 0, printed
    for line in ("refine", "export", "perplexity dense", "perplexity sparse", "mean KLD", "top-1 agreement",
                 "torch ppl (sparse)", "gate passed: 2 threshold(s)"):
        assert line in printed
    info = read_gguf_info(out)
    assert info.file_type_name == "F32" and info.metadata["dsnot.sparsity"] == pytest.approx(0.6)
    report = json.loads((tmp_path / "model.report.json").read_text())
    assert report["gate"]["passed"] and report["settings"]["model"] == str(ckpt)
    assert report["refine"]["manifest_sparsity"]["pruned_linears"] == pytest.approx(0.6, abs=0.01)
    results = report["results"]
    assert results["n_chunks"] == 3 and results["ctx"] == 64 and 0 < results["top1"] <= 1
    assert results["kld_mean"] > 0  # 60% of the weights are gone: the distributions differ
    assert abs(results["torch"]["relative_difference"]) < 1e-4  # F32 GGUF vs torch on the same tokens
    assert (tmp_path / "model.report.md").read_text().startswith("# Validation of model.gguf")
    assert (tmp_path / "model.report.png").read_bytes()[:4] == b"\x89PNG"
    assert (keep / "sparsity.json").is_file() and (keep / "config.json").is_file()
    assert report["models"]["dense"]["origin"]["kind"] == "exported"
    assert read_gguf_info(report["models"]["dense"]["origin"]["gguf"]).file_type_name == "F32"
    assert list(scratch.iterdir()) == []  # the temporary folders are gone
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_temporary_checkpoint_is_removed_and_failing_gate_exits_1(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    ckpt, text = tiny
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    out = tmp_path / "m.gguf"
    code = main(_args(ckpt, text, out, tmp_path / "cache", "--method", "magnitude", "--pattern", "2:4",
                      "--no-torch-reference", "--max-kld", "0"))
    printed = capsys.readouterr().out
    assert code == 1
    assert "FAIL: mean KLD" in printed and "--max-kld by" in printed
    assert out.is_file() and (tmp_path / "m.report.json").is_file()  # written even when the gate fails
    assert json.loads((tmp_path / "m.report.json").read_text())["gate"]["passed"] is False
    assert read_gguf_info(out).metadata["dsnot.pattern"] == "2:4"
    assert list(scratch.iterdir()) == []


def test_no_validate_writes_only_the_gguf(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "m.gguf"
    assert main(_args(ckpt, text, out, tmp_path / "cache", "--no-validate")) == 0
    assert out.is_file() and not (tmp_path / "m.report.json").exists()
    assert not (tmp_path / "cache").exists()  # no dense export either


@pytest.mark.parametrize("extra,expected", [((), "Q4_0"), (("--no-quantize",), None),
                                            (("--quantize", "Q5_0"), "Q5_0")])
def test_quantized_types_are_quantized_in_refinement_by_default(tiny, tmp_path: Path, extra, expected) -> None:
    ckpt, text = tiny
    args = _args(ckpt, text, tmp_path / "m.gguf", tmp_path / "cache", "--no-validate", "--refine", "none",
                 "--keep-checkpoint", str(tmp_path / "ck"), *extra)
    args[args.index("F32")] = "Q4_0"
    assert main(args) == 0
    manifest = json.loads((tmp_path / "ck" / "sparsity.json").read_text())
    assert (manifest.get("quantize") or {}).get("type") == expected
    report = json.loads((tmp_path / "m.gguf.export.json").read_text())
    exact = report["zeros"]["tensors_written_exactly"]
    assert (exact == report["zeros"]["tensors"]) == (expected == "Q4_0")  # Q5_0 values are rounded again to Q4_0


def test_stream_gives_the_same_gguf_as_in_memory(tiny, tmp_path: Path) -> None:
    ckpt, text = tiny
    outs = []
    for name, extra in (("mem", []), ("stream", ["--stream", "--deterministic", "--no-memory-check"])):
        out = tmp_path / f"{name}.gguf"
        assert main(_args(ckpt, text, out, tmp_path / "cache", "--no-validate", "--refine", "none", *extra)) == 0
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


def test_resume_and_state_reach_the_refine_job(tiny, tmp_path: Path, monkeypatch) -> None:
    from dsnot_deploy.layerwise import refine as refine_module

    jobs = []
    real = refine_module.refine
    monkeypatch.setattr(refine_module, "refine", lambda job: jobs.append(job) or real(job))
    ckpt, text = tiny
    keep = tmp_path / "keep"
    args = _args(ckpt, text, tmp_path / "m.gguf", tmp_path / "cache", "--no-validate", "--refine", "none")
    assert main([*args, "--keep-checkpoint", str(keep), "--resume"]) == 0  # nothing to resume: a full run
    assert (keep / "sparsity.json").is_file() and not (tmp_path / ".keep.resume").exists()
    assert main([*args[:2], str(tmp_path / "n.gguf"), *args[3:]]) == 0
    assert [(j.resume, j.save_state) for j in jobs] == [(True, True), (False, False)]  # no state for a temporary


@pytest.mark.parametrize("case", ["suffix", "exists", "keep-exists", "bad-gate", "bad-type", "zero-loss",
                                  "resume-no-keep"])
def test_bad_inputs_exit_2_before_any_work(tiny, tmp_path: Path, capsys, case: str) -> None:
    ckpt, text = tiny
    out = tmp_path / "m.gguf"
    extra: list[str] = []
    if case == "suffix":
        out = tmp_path / "m.bin"
    elif case == "exists":
        out.write_bytes(b"old")
    elif case == "keep-exists":
        (tmp_path / "keep").mkdir()
        extra = ["--keep-checkpoint", str(tmp_path / "keep")]
    elif case == "bad-gate":
        extra = ["--min-top1", "95"]
    elif case == "bad-type":
        extra = ["--type", "Q9_9"]
    elif case == "zero-loss":
        extra = ["--type", "Q4_1"]  # has a block offset: pruned zeros would not survive
    elif case == "resume-no-keep":
        extra = ["--resume"]  # the state of a temporary checkpoint cannot be found again
    assert main(_args(ckpt, text, out, tmp_path / "cache", *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error:" in err
    assert not (tmp_path / "m.report.json").exists() and not (tmp_path / "cache").exists()
    if case == "exists":
        assert out.read_bytes() == b"old"


def test_model_is_optional_and_the_default_is_reduced() -> None:
    args = build_parser().parse_args(["refine-and-export", "out.gguf"])
    assert args.model is None and args.out == Path("out.gguf")
    assert args.nsamples is None and args.seqlen is None and args.ctx is None and args.max_chunks is None
    reduced = refine_and_export.DEFAULT_REDUCED
    assert reduced["nsamples"] * reduced["seqlen"] <= 16 * 512 and reduced["ctx"] * reduced["max_chunks"] <= 8 * 512
    args = build_parser().parse_args(["refine-and-export", "m", "out.gguf", "--nsamples", "8"])
    assert args.model == "m" and args.nsamples == 8
