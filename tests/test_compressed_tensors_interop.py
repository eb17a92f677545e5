"""Interop with the real compressed-tensors 0.14 (the last release that reads the bitmask layouts).

Skipped unless `compressed_tensors` imports. It declares transformers<5, which this package does not
use for these code paths, so install it beside ours without its dependencies:

    pip install --no-deps compressed-tensors==0.14.0 loguru && python -m pytest -q tests/test_compressed_tensors_interop.py

Both directions: compressed-tensors decompresses our `pack --format ...` output to exactly our
weights, and our `unpack` restores exactly what compressed-tensors' own compressor wrote.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

ct = pytest.importorskip("compressed_tensors")

from dsnot_deploy.cli import main
from tests.test_bitmask_checkpoint import _sparse_checkpoint

CASES = [("sparse-bitmask", "0.6"), ("sparse-24-bitmask", "2:4")]


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("fmt,pattern", CASES)
def test_compressed_tensors_reads_our_output(tmp_path: Path, fmt: str, pattern: str) -> None:
    from compressed_tensors.compressors import ModelCompressor

    ckpt = _sparse_checkpoint(tmp_path, pattern)
    packed = tmp_path / "packed"
    assert main(["pack", "--format", fmt, str(ckpt), str(packed), "-q"]) == 0
    compressor = ModelCompressor.from_pretrained(str(packed))
    assert compressor is not None and compressor.sparsity_compressor is not None
    assert compressor.sparsity_config.format == fmt
    theirs = dict(compressor.sparsity_compressor.decompress(str(packed)))
    ours = load_file(str(ckpt / "model.safetensors"))
    assert theirs.keys() == ours.keys()
    compressed = [k for k in load_file(str(packed / "model.safetensors")) if k.endswith(".bitmask")]
    assert len(compressed) == 14
    for name, t in ours.items():
        assert _bits_equal(theirs[name].to(t.dtype), t), name


@pytest.mark.parametrize("fmt,pattern", CASES)
def test_we_read_compressed_tensors_output(tmp_path: Path, fmt: str, pattern: str) -> None:
    from compressed_tensors.compressors import BaseCompressor, ModelCompressor
    from compressed_tensors.config import SparsityCompressionConfig

    ckpt = _sparse_checkpoint(tmp_path, pattern)
    state = load_file(str(ckpt / "model.safetensors"))
    targets = {k[: -len(".weight")] for k in state if ".layers." in k and k.endswith("proj.weight")}
    config = SparsityCompressionConfig.load_from_registry(fmt, targets=sorted(targets))
    compressor = BaseCompressor.load_from_registry(fmt, config=config)
    compressed = compressor.compress(state, compression_targets=targets)
    theirs = tmp_path / "theirs"
    shutil.copytree(ckpt, theirs)
    (theirs / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in compressed.items()}, str(theirs / "model.safetensors"),
              metadata={"format": "pt"})
    ModelCompressor(sparsity_config=config).update_config(str(theirs))  # their config.json entry
    assert json.loads((theirs / "config.json").read_text())["quantization_config"]["sparsity_config"]["format"] == fmt
    restored = tmp_path / "restored"
    assert main(["unpack", str(theirs), str(restored), "-q"]) == 0
    back = load_file(str(restored / "model.safetensors"))
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert _bits_equal(back[name], t), name
