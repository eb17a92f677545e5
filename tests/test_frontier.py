"""`frontier`: the pure Pareto fronts, the plan's checks, and a tiny end-to-end run with resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.frontier.pareto import dominated_by, front_indices, on_front
from dsnot_deploy.frontier.plan import FrontierPoint, plan_points

# -- Pareto fronts (pure) ------------------------------------------------------------------------------


def test_front_of_hand_made_points() -> None:
    pts = [(10.0, 1.0), (5.0, 2.0), (7.0, 2.5), (3.0, 4.0), (12.0, 0.9), (4.0, 4.0), (12.0, 1.5)]
    assert on_front(pts) == [True, True, False, True, True, False, False]
    assert front_indices(pts) == [3, 1, 0, 4]  # by increasing size
    assert dominated_by(pts, 2) == [1]  # (5, 2) is smaller and better than (7, 2.5)
    assert dominated_by(pts, 5) == [3]  # same value, larger size
    assert dominated_by(pts, 6) == [0, 4]  # same size as (12, 0.9) but worse
    assert dominated_by(pts, 0) == []


def test_ties_and_degenerate_points() -> None:
    assert on_front([(1.0, 1.0), (1.0, 1.0)]) == [True, True]  # identical points: both on the front
    assert on_front([(1.0, 2.0), (1.0, 1.0), (1.0, 1.0)]) == [False, True, True]  # same size: the lowest value
    assert on_front([(1.0, 1.0), (2.0, 1.0)]) == [True, False]  # same value: the smaller size
    assert on_front([]) == []
    assert on_front([(1.0, float("nan")), (2.0, 3.0)]) == [False, True]  # NaN is never on the front
    assert front_indices([(2.0, 1.0), (1.0, 1.0), (1.0, 1.0)]) == [1, 2]


# -- the plan --------------------------------------------------------------------------------------------


def test_plan_always_starts_with_the_dense_f16_reference_and_adds_the_quantized_arm() -> None:
    pts = plan_points(["q4_0"], ["0.50", "2:4"], ["F16", "Q4_0", "SPARSE_Q4"])
    assert pts[0] == FrontierPoint(None, "F16") and pts[1] == FrontierPoint(None, "Q4_0")
    keys = [p.key for p in pts]
    assert keys == ["dense-F16", "dense-Q4_0", "sparse-0.5-F16", "sparse-0.5-Q4_0", "sparse-0.5-SPARSE_Q4",
                    "sparse-0.5-Q4_0-rq", "sparse-0.5-SPARSE_Q4-rq", "sparse-2of4-F16", "sparse-2of4-Q4_0",
                    "sparse-2of4-SPARSE_Q4", "sparse-2of4-Q4_0-rq", "sparse-2of4-SPARSE_Q4-rq"]
    assert pts[5].label == "50% Q4_0 +rq" and pts[5].state == "sparse-0.5-rqQ4_0"
    assert [p.key for p in plan_points(["F16"], ["0.3"], ["Q8_0"], [])] == ["dense-F16", "sparse-0.3-Q8_0"]


@pytest.mark.parametrize("kwargs, match", [
    ({"dense_types": ["Q9_9"]}, "unknown output type"),
    ({"sparse_types": ["Q4_K_M"]}, "keep pruned zeros"),
    ({"sparsities": ["1.5"]}, r"\(0, 1\)"),
    ({"sparsities": ["3:2"]}, "N:M"),
    ({"sparsities": ["half"]}, "sparsity like"),
    ({"sparse_types": ["F16"], "quantize_types": ["F16"]}, "quantization types among"),
    ({"sparse_types": ["Q8_0"], "quantize_types": ["Q4_0"]}, "among the sparse types"),
])
def test_plan_errors(kwargs, match) -> None:
    with pytest.raises(UserInputError, match=match):
        plan_points(**kwargs)


def test_cli_bad_input_exits_2(tmp_path: Path, capsys) -> None:
    from dsnot_deploy.cli import main

    assert main(["frontier", "m", str(tmp_path / "o"), "--sparse-types", "Q4_1"]) == 2
    assert "keep pruned zeros" in capsys.readouterr().err
    assert main(["frontier", "m", str(tmp_path / "o"), "--sparsities", "0"]) == 2
    assert main(["frontier", "m", str(tmp_path / "o"), "--sparsity", "0.5"]) == 2
    assert "--sparsities" in capsys.readouterr().err
    assert main(["frontier", "m", str(tmp_path / "o"), "--dtype", "bfloat16"]) == 2
    assert "float32" in capsys.readouterr().err
    assert main(["frontier", "no/such/model/dir", str(tmp_path / "o"), "--sparsities"]) == 2
    assert main(["frontier", "smollm2-135m", str(tmp_path / "o"), "--text", str(tmp_path / "none.txt")]) == 2
    assert not (tmp_path / "o").exists()


# -- a tiny end-to-end run --------------------------------------------------------------------------------

TEXT = " ".join(
    f"Sentence number {i} tells the quick brown fox to jump over the lazy dog; the rest are zero." for i in range(120)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("llama_cpp")
    from tests.helpers_tokenizer import make_tiny_tokenizer
    from tests.tiny_models import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("frontier")
    ckpt = save_tiny_checkpoint(root / "dense", arch="llama", tokenizer=make_tiny_tokenizer(), vocab_size=320,
                                bos_token_id=0, eos_token_id=1, pad_token_id=2)
    text = root / "text.txt"
    text.write_text(TEXT)
    return ckpt, text


def _args(ckpt: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["frontier", str(ckpt), str(out), "--dense-types", "Q8_0", "--sparsities", "0.5", "--sparse-types",
            "F16", "Q8_0", "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "--text", str(text),
            "--ctx", "64", "--max-chunks", "3", "--threads", "1", "--quant-shrinks", "1.0", "-q", *extra]


def test_end_to_end_rows_fronts_files_and_resume(tiny, tmp_path: Path, capsys, monkeypatch) -> None:
    from dsnot_deploy.cli import main
    from dsnot_deploy.frontier import run as run_module

    ckpt, text = tiny
    out = tmp_path / "fr"
    assert main(_args(ckpt, text, out)) == 0
    printed = capsys.readouterr().out
    doc = json.loads((out / "frontier.json").read_text())
    rows = {r["key"]: r for r in doc["rows"]}
    assert list(rows) == ["dense-F16", "dense-Q8_0", "sparse-0.5-F16", "sparse-0.5-Q8_0", "sparse-0.5-Q8_0-rq"]
    assert rows["dense-F16"]["ratio"] == 1.0
    assert len({r["tokens_sha256"] for r in rows.values()}) == 1 and rows["dense-F16"]["n_scored"] == 3 * 31  # llama.cpp protocol: ctx/2 - 1 scored
    for r in rows.values():
        assert r["gguf_bytes"] > 0 and r["pack_bytes"] > 0 and r["ppl"] > 1
    assert rows["sparse-0.5-Q8_0"]["sparsity_achieved"] == pytest.approx(0.5, abs=0.01)
    assert rows["sparse-0.5-Q8_0"]["pack_bytes"] < rows["dense-Q8_0"]["pack_bytes"]  # zeros pack smaller
    n, total = rows["sparse-0.5-Q8_0-rq"]["on_lattice"]
    assert n == total > 0  # exported with no second rounding
    for size in ("gguf", "pack"):
        flags = on_front([(r[f"{size}_bytes"], r["ppl"]) for r in doc["rows"]])
        assert [r[f"on_{size}_front"] for r in doc["rows"]] == flags and any(flags)
    front = [r["label"] for r in doc["rows"] if r["on_gguf_front"]]
    assert doc["sentence"] in printed and all(label in doc["sentence"] for label in front)
    md = (out / "frontier.md").read_text()
    assert doc["sentence"] in md and md.count("\n| ") == 1 + len(rows)
    assert (out / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (out / "work").iterdir()) == []  # GGUFs, packs and checkpoints deleted
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporaries left

    plain = tmp_path / "plain"
    assert main(_args(ckpt, text, plain, "--no-refine-quantize")) == 0
    before = json.loads((plain / "frontier.json").read_text())["rows"]

    def must_not_run(*a, **k):
        raise AssertionError("a measured configuration was measured again")

    monkeypatch.setattr(run_module, "_measure", must_not_run)
    monkeypatch.setattr(run_module, "_checkpoint", must_not_run)
    assert main(_args(ckpt, text, out)) == 0  # resume: every row exists, nothing recomputed
    assert json.loads((out / "frontier.json").read_text())["rows"] == doc["rows"]
    assert main(_args(ckpt, text, out, "--ctx", "32")) == 2  # other settings: refused, not mixed
    assert "other settings (eval)" in capsys.readouterr().err
    assert main(_args(ckpt, text, out, "--quant-diag-shrink", "0.5")) == 2  # the -rq row depends on it
    assert "other settings (quantize)" in capsys.readouterr().err
    # rows without in-refinement quantization are reused whatever the quantization settings
    assert main(_args(ckpt, text, plain, "--no-refine-quantize", "--quant-diag-shrink", "0.5")) == 0
    assert json.loads((plain / "frontier.json").read_text())["rows"] == before
