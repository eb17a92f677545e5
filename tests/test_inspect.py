"""`dsnot-deploy inspect` on GGUF files and packs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from converters.pack_inspect import inspect_file
from converters.sparse_pack import pack_gguf
from dsnot_deploy.cli import main
from tests import pack_fixtures as F


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("insp")
    tensors = [
        ("blk.0.u60", F.encode(rng, F.unstructured(rng, 8, 512, 0.6), "F16"), "F16"),
        ("blk.0.nm24", F.encode(rng, F.n_m(rng, 8, 512, 2, 4), "Q8_0"), "Q8_0"),
        ("blk.0.nm48", F.encode(rng, F.n_m(rng, 8, 512, 4, 8), "F32"), "F32"),
        ("blk.0.dense", F.encode(rng, F.unstructured(rng, 4, 256, 0.0), "BF16"), "BF16"),
        ("blk.0.k6", F.encode(rng, F.unstructured(rng, 2, 256, 0.5), "Q6_K"), "Q6_K"),
        ("q41", np.zeros((2, 32 // 32 * 20), np.uint8), "Q4_1"),
    ]
    g = F.write_gguf(d / "m.gguf", tensors)
    pack_gguf(g, d / "m.pack")
    return g, d / "m.pack"


def test_inspect_gguf_reports_types_sparsity_patterns_and_metadata(files, capsys) -> None:
    g, _ = files
    info = inspect_file(g)
    t = {x["name"]: x for x in info["tensors"]}
    assert t["blk.0.u60"]["type"] == "F16" and t["blk.0.u60"]["shape"] == [8, 512]
    assert t["blk.0.u60"]["sparsity"] == pytest.approx(0.6, abs=1e-3) and t["blk.0.u60"]["pattern"] == "unstructured"
    assert t["blk.0.nm24"]["pattern"] == "2:4"
    assert t["blk.0.nm48"]["pattern"] == "4:8" and t["blk.0.nm48"]["sparsity"] == 0.5
    assert t["blk.0.dense"]["pattern"] == "dense"
    assert t["blk.0.k6"]["sparsity"] == 0.5
    assert t["q41"]["sparsity"] is None  # a type that does not keep zeros: no claim
    keys = {m["key"]: m for m in info["metadata"]}
    assert keys["general.name"]["value"] == "tiny-pack-test"
    assert keys["tokenizer.ggml.tokens"]["count"] == 40
    assert main(["inspect", str(g)]) == 0
    out = capsys.readouterr().out
    assert "general.name" in out and "blk.0.nm24" in out and "2:4" in out and "(40 items)" in out


def test_inspect_pack_reports_breakdown_and_encodings(files, tmp_path: Path, capsys) -> None:
    _, p = files
    info = inspect_file(p)
    assert sum(info["breakdown"].values()) == info["size"] == p.stat().st_size
    assert info["breakdown"]["mask"] > 0 and info["breakdown"]["values"] > 0
    t = {x["name"]: x for x in info["tensors"]}
    assert t["blk.0.nm24"]["mask"] == "nm" and t["blk.0.nm24"]["nm"] == [2, 4]
    assert t["q41"]["encoding"] == "raw"
    assert main(["inspect", str(p), "--json", str(tmp_path / "i.json")]) == 0
    out = capsys.readouterr().out
    assert "size breakdown" in out and "2:4" in out
    assert json.loads((tmp_path / "i.json").read_text())["kind"] == "pack"


def test_inspect_rejects_other_files(tmp_path: Path, capsys) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello world, not a gguf file")
    assert main(["inspect", str(tmp_path / "x.bin")]) == 2
    assert main(["inspect", str(tmp_path / "missing.gguf")]) == 2
    assert "Traceback" not in capsys.readouterr().err
