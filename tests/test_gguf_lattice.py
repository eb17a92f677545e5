"""Q4_0 / Q5_0 blocks at scales ggml would not pick are written exactly (converters.gguf_lattice), and
`export --embedding-type` writes the token embedding at its own type."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import quants

from converters.gguf_export import EMBEDDING_NAMES, ExportConfig, export_gguf
from converters.gguf_lattice import LEVELS, encode_exact, find_levels
from converters.gguf_stream import encode
from dsnot_deploy.errors import UserInputError
from tests.tiny_models import save_tiny_checkpoint

Q = gguf.GGMLQuantizationType
TYPES = [Q.Q4_0, Q.Q5_0]


def _on_lattice(qtype: Q, rows: int = 16, cols: int = 128, seed: int = 0) -> np.ndarray:
    """Values k * d16 with every level of the type used and largest levels that are mostly not ggml's anchor."""
    lo, hi = LEVELS[qtype]
    rng = np.random.default_rng(seed)
    n = rows * cols // 32
    d = (rng.standard_normal((n, 1)) * 0.02).astype(np.float16).astype(np.float32)
    top = rng.integers(1, -lo + 1, size=(n, 1))
    k = np.clip(np.round(rng.uniform(-1, 1, size=(n, 32)) * top), lo, hi)
    k[:, 0] = np.arange(n) % (hi - lo + 1) + lo  # every level somewhere, the fifth bit of Q5_0 included
    k[rng.random(k.shape) < 0.3] = 0
    return (k * d).astype(np.float32).reshape(rows, cols)


def _bits(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, dtype=np.float32) + np.float32(0.0)).view(np.uint32)


@pytest.mark.parametrize("qtype", TYPES)
def test_on_lattice_values_round_trip_bit_for_bit_where_ggml_would_round_again(qtype: Q) -> None:
    values = _on_lattice(qtype)
    ggml = quants.dequantize(quants.quantize(values, qtype), qtype).reshape(values.shape)
    assert not np.array_equal(_bits(ggml), _bits(values))  # the case this module exists for
    data = encode_exact(values, qtype)
    assert data.shape == np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8).shape
    back = quants.dequantize(data, qtype).reshape(values.shape)
    assert np.array_equal(_bits(back), _bits(values))
    assert np.array_equal(encode(values, qtype, exact=True), data)  # export's encoder for quantized checkpoints


@pytest.mark.parametrize("qtype", TYPES)
def test_off_lattice_and_ggml_own_blocks_keep_ggml_bytes(qtype: Q) -> None:
    rng = np.random.default_rng(1)
    noise = rng.standard_normal((8, 64)).astype(np.float32)
    ref = np.ascontiguousarray(quants.quantize(noise, qtype)).view(np.uint8)
    assert np.array_equal(encode_exact(noise, qtype), ref)
    once = quants.dequantize(ref, qtype).reshape(noise.shape).astype(np.float32)  # ggml's own lattice
    assert np.array_equal(encode_exact(once, qtype), np.ascontiguousarray(quants.quantize(once, qtype)).view(np.uint8))
    mixed = np.concatenate([noise[:, :32], _on_lattice(qtype, rows=8, cols=32, seed=3)], axis=1)
    back = quants.dequantize(encode_exact(mixed, qtype), qtype).reshape(mixed.shape)
    assert np.array_equal(_bits(back[:, 32:]), _bits(mixed[:, 32:]))  # block by block
    ggml_first = quants.dequantize(quants.quantize(mixed[:, :32], qtype), qtype).reshape(8, 32)
    assert np.array_equal(_bits(back[:, :32]), _bits(ggml_first))


def test_find_levels_reports_zero_blocks_and_rejects_fine_values() -> None:
    blocks = np.zeros((3, 32), dtype=np.float32)
    blocks[1] = np.float32(0.1) + np.arange(32, dtype=np.float32) * np.float32(1e-3)  # low mantissa bits set
    blocks[2, :4] = np.float32(np.float16(0.25)) * np.array([-3, 1, 2, 0], dtype=np.float32)
    found, scales, levels = find_levels(blocks, Q.Q4_0)
    assert found.tolist() == [True, False, True]
    assert np.array_equal(levels[2, :4].astype(np.float32) * scales[2].astype(np.float32), blocks[2, :4])


# -- export --embedding-type --------------------------------------------------------------------------

def _types(path: Path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}


@pytest.mark.parametrize("qtype,embedding", [("Q4_0", "Q8_0"), ("F16", "Q4_0"), ("Q4_K_M", "Q8_0")])
def test_embedding_type_sets_only_the_embedding(tmp_path: Path, qtype: str, embedding: str) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama")
    plain = export_gguf(ckpt, tmp_path / "a.gguf", ExportConfig(qtype=qtype, progress=False))
    report = export_gguf(ckpt, tmp_path / "b.gguf", ExportConfig(qtype=qtype, progress=False, embedding_type=embedding))
    a, b = _types(tmp_path / "a.gguf"), _types(tmp_path / "b.gguf")
    heads = [n for n in EMBEDDING_NAMES if n in a]  # the tiny model's output head is untied
    assert heads and all(b[n] == embedding for n in heads) and any(a[n] != embedding for n in heads)
    assert {k: v for k, v in a.items() if k not in heads} == {k: v for k, v in b.items() if k not in heads}
    assert report["tensor_types"][embedding] >= 1 and plain["file_bytes"] != report["file_bytes"]


def test_embedding_type_error() -> None:
    with pytest.raises(UserInputError, match="embedding type among"):
        ExportConfig(qtype="Q4_0", embedding_type="Q4_K")
