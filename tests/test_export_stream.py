"""Streaming export (converters/gguf_stream.py): chunk size never changes the bytes, the streamed zero
counts equal a read-back of the file, --no-verify writes the same file, bf16 checkpoints read exactly."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converters import gguf_stream
from converters.gguf_arch import find_arch
from converters.gguf_export import ExportConfig, export_gguf
from converters.gguf_zeros import count_zeros
from converters.hf_source import open_checkpoint
from tests.tiny_models import save_tiny_checkpoint


def _sparse_checkpoint(root: Path, dtype: torch.dtype = torch.float32) -> Path:
    ckpt = save_tiny_checkpoint(root, arch="llama", seed=5)
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for name, t in tensors.items():
        if t.ndim == 2 and ".layers." in name:
            t[torch.rand(t.shape, generator=gen) < 0.5] = 0.0
        tensors[name] = t.to(dtype).contiguous()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_chunk_size_does_not_change_the_file(tmp_path: Path, monkeypatch, qtype: str) -> None:
    ckpt = _sparse_checkpoint(tmp_path / "c")
    whole = tmp_path / "whole.gguf"
    report = export_gguf(ckpt, whole, ExportConfig(qtype=qtype, progress=False))
    monkeypatch.setattr(gguf_stream, "CHUNK_BYTES", 3 * 64 * 4)  # three rows of 64 per chunk
    rows = tmp_path / "rows.gguf"
    chunked = export_gguf(ckpt, rows, ExportConfig(qtype=qtype, progress=False))
    assert rows.read_bytes() == whole.read_bytes()
    assert chunked["zeros_per_tensor"] == report["zeros_per_tensor"]
    assert report["zeros"]["zeros_in_checkpoint"] > 0 and report["zeros"]["kept_fraction"] == 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qtype", ["F16", "Q8_0"])
def test_streamed_zero_counts_equal_a_read_back(tmp_path: Path, dtype: torch.dtype, qtype: str) -> None:
    ckpt = _sparse_checkpoint(tmp_path / "c", dtype)
    out = tmp_path / "m.gguf"
    report = export_gguf(ckpt, out, ExportConfig(qtype=qtype, progress=False))
    hf = open_checkpoint(ckpt)
    spec = find_arch(hf.architecture)
    to_hf = {z["name"]: z for z in report["zeros_per_tensor"]}
    plan = {t.name: t for t in gguf.GGUFReader(out).tensors}
    names = {n: next(k for k in hf.tensors if gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2).get_name(
        k, try_suffixes=(".weight", ".bias")) == n) for n in to_hf}

    def source(name: str) -> np.ndarray:
        return spec.transform(names[name], hf.load(names[name]), hf.text_config)

    reference = count_zeros(gguf.GGUFReader(out), [n for n in plan if n in to_hf], source)
    assert [z.as_dict() for z in reference] == report["zeros_per_tensor"]
    if qtype == "F16" and dtype == torch.float16:  # stored bytes written as they are
        assert report["zeros"]["tensors_written_exactly"] == report["zeros"]["tensors"]


def test_bf16_rows_read_exactly(tmp_path: Path) -> None:
    ckpt = _sparse_checkpoint(tmp_path / "c", torch.bfloat16)
    hf = open_checkpoint(ckpt)
    ref = load_file(ckpt / "model.safetensors")
    for name, t in ref.items():
        assert np.array_equal(hf.load(name), t.float().numpy())
        if t.ndim == 2:
            assert np.array_equal(hf.read_rows(name, 3, 7), t[3:7].float().numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_zero_counts_on_stored_bits_equal_the_float_count(tmp_path: Path, dtype: torch.dtype) -> None:
    """count_zeros reads the stored bits (sign masked): -0.0 is a zero, the smallest subnormals are not."""
    ckpt = _sparse_checkpoint(tmp_path / "c", dtype)
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    name = next(n for n, t in tensors.items() if t.ndim == 2)
    w = tensors[name].clone()
    flat = w.view(-1)
    flat[:3] = torch.tensor([-0.0, torch.finfo(dtype).smallest_normal / 4, -torch.finfo(dtype).tiny / 2], dtype=dtype)
    tensors[name] = w
    save_file(tensors, path)
    hf = open_checkpoint(ckpt)
    for n, t in tensors.items():
        assert hf.count_zeros(n) == (int((t.float() == 0).sum()), t.numel())


def test_no_verify_writes_the_same_file(tmp_path: Path) -> None:
    ckpt = _sparse_checkpoint(tmp_path / "c")
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(ckpt, a, ExportConfig(qtype="Q8_0", progress=False))
    report = export_gguf(ckpt, b, ExportConfig(qtype="Q8_0", progress=False, verify=False))
    assert a.read_bytes() == b.read_bytes()
    assert report["zeros"] is None and report["zeros_per_tensor"] == []
    assert json.loads(Path(str(b) + ".export.json").read_text())["zeros"] is None


def test_corrupted_bytes_on_disk_are_caught(tmp_path: Path, monkeypatch) -> None:
    """The read-back compares the file's bytes with what was written."""
    from dsnot_deploy.errors import DsnotError

    ckpt = _sparse_checkpoint(tmp_path / "c")
    real = gguf_stream.stream_tensors

    def corrupting(writer, *args, **kwargs):
        written = real(writer, *args, **kwargs)
        fout = writer.fout[0]
        fout.seek(-40, 1)
        fout.write(b"\x55")
        fout.seek(0, 2)
        return written

    monkeypatch.setattr("converters.gguf_export.stream_tensors", corrupting)
    with pytest.raises(DsnotError, match="read back differ"):
        export_gguf(ckpt, tmp_path / "m.gguf", ExportConfig(qtype="F16", progress=False))
    assert not (tmp_path / "m.gguf").exists()
