"""scripts/bench_scale.py --smoke: every step of the product at tiny widths, the fit, the reports."""

from __future__ import annotations

import json
from pathlib import Path

from tests.script_loader import load_script


def _bench():
    return load_script("bench_scale")


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


def test_remeasure_replaces_only_the_named_steps_of_cached_shapes(tmp_path: Path) -> None:
    cache = tmp_path / "cache.jsonl"
    bench = _bench()
    assert bench.main(["--smoke", "--devices", "cpu", "--steps", "wanda", "exact", "admm", "--cache", str(cache),
                       "--out", str(tmp_path / "a")]) == 0
    first = [json.loads(line) for line in cache.read_text().splitlines()]
    assert bench.main(["--smoke", "--devices", "cpu", "--steps", "wanda", "exact", "admm", "--cache", str(cache),
                       "--remeasure", "admm", "--out", str(tmp_path / "b")]) == 0
    latest = {}
    for line in cache.read_text().splitlines():
        row = json.loads(line)
        latest[row["key"]] = row["value"]
    shapes = [r for r in first if json.loads(r["key"])[0] == "shape"]
    assert shapes and len(cache.read_text().splitlines()) > len(first)
    for row in shapes:
        now = latest[row["key"]]
        assert now["wanda"] == row["value"]["wanda"] and now["exact"] == row["value"]["exact"]
        assert now["admm"] != row["value"]["admm"]  # measured again (a timing never repeats to the bit)
