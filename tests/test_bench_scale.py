"""scripts/bench_scale.py --smoke: every step of the product at tiny widths, the fit, the reports."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "scripts" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_scale_smoke_writes_reports(tmp_path: Path) -> None:
    assert _bench().main(["--smoke", "--devices", "cpu", "cuda", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "bench_scale.json").read_text())
    cpu = data["results"]["cpu"]
    steps = {"wanda", "sparsegpt", "dsnot", "exact", "admm", "gptq"}
    assert set(cpu["models"]) == steps | {"stats"}
    smoke = cpu["widths"]["smoke"]
    assert set(smoke["layer_seconds"]) == steps and all(v > 0 for v in smoke["layer_seconds"].values())
    assert smoke["ratio_default_over_sparsegpt"] > 0
    # down_proj (64 x 128) runs on a row subset and is extrapolated; q_proj runs whole
    assert smoke["linears"]["down_proj"]["admm"]["extrapolated"]
    assert not smoke["linears"]["q_proj"]["admm"]["extrapolated"]
    assert set(cpu["verify"]) == steps
    if data["results"].get("cuda") is None:  # no GPU: the CUDA path is skipped, and says so
        assert "cuda: skipped" in (tmp_path / "bench_scale.md").read_text()
