"""Tiny GGUF files and sparse weights for the pack tests (seeded, milliseconds each).

Q6_K and Q3_K blocks (gguf-py cannot write them) are built here weight by weight from the bit
layout of gguf-py's dequantizers, independently of converters/pack_blocks.py; tests check them
against `gguf.quants.dequantize`.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import gguf
import numpy as np

QTYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q5_0", "Q6_K", "Q3_K")


def unstructured(rng: np.random.Generator, rows: int, cols: int, sparsity: float) -> np.ndarray:
    """Each row gets exactly int(cols * sparsity) zeros at random places; the rest is non-zero."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[np.abs(w) < 1e-3] = 0.5
    k = int(cols * sparsity)
    idx = np.argsort(rng.random((rows, cols)), axis=1)[:, :k]
    np.put_along_axis(w, idx, 0.0, axis=1)
    return w


def nonuniform(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Row sparsity rises from 0 to 0.95 down the tensor; a few rows entirely zero."""
    w = np.concatenate([unstructured(rng, 1, cols, s) for s in np.linspace(0.0, 0.95, rows)])
    w[rows // 3] = 0.0
    return w


def n_m(rng: np.random.Generator, rows: int, cols: int, n: int, m: int) -> np.ndarray:
    """n zeros in every group of m along rows; groups cycle through all C(m, n) patterns first."""
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[np.abs(w) < 1e-3] = 0.5
    combos = list(itertools.combinations(range(m), n))
    g = w.reshape(-1, m)
    choice = np.arange(g.shape[0]) % len(combos)
    choice[len(combos):] = rng.integers(0, len(combos), max(g.shape[0] - len(combos), 0))
    for gi, c in enumerate(choice):
        g[gi, list(combos[c])] = 0.0
    return g.reshape(rows, cols)


def _f16(x: float) -> np.ndarray:
    return np.frombuffer(np.float16(x).tobytes(), np.uint8)


def q6_k_blocks(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q: (nb, 256) ints in [-32, 31]; scales (nb, 16) int8; d (nb,) float -> (nb, 210) uint8."""
    nb = q.shape[0]
    out = np.zeros((nb, 210), np.uint8)
    for b in range(nb):
        for e in range(256):
            c = int(q[b, e]) + 32
            h, r = divmod(e, 128)
            g, i = divmod(r, 32)
            out[b, h * 64 + (g % 2) * 32 + i] |= (c & 15) << (4 * (g // 2))
            out[b, 128 + h * 32 + i] |= (c >> 4) << (2 * g)
        out[b, 192:208] = scales[b].astype(np.int8).view(np.uint8)
        out[b, 208:210] = _f16(d[b])
    return out


def q3_k_blocks(q: np.ndarray, scales: np.ndarray, d: np.ndarray) -> np.ndarray:
    """q: (nb, 256) ints in [-4, 3]; scales (nb, 16) ints in [-32, 31]; d (nb,) -> (nb, 110) uint8."""
    nb = q.shape[0]
    out = np.zeros((nb, 110), np.uint8)
    for b in range(nb):
        for e in range(256):
            c = int(q[b, e]) + 4
            j, i = divmod(e, 32)
            h, s = divmod(j, 4)
            out[b, 32 + h * 32 + i] |= (c & 3) << (2 * s)
            out[b, i] |= (c >> 2) << j
        for k in range(16):
            sc = int(scales[b, k]) + 32
            out[b, 96 + k % 8] |= (sc & 15) << (4 * (k // 8))
            out[b, 104 + k % 4] |= (sc >> 4) << (2 * (k // 4))
        out[b, 108:110] = _f16(d[b])
    return out


def k_quant(rng: np.random.Generator, w: np.ndarray, qtype: str) -> np.ndarray:
    """Hand-built Q6_K / Q3_K bytes (rows, row_bytes) whose zero weights are exactly w's zeros."""
    rows, _cols = w.shape
    lim = 31 if qtype == "Q6_K" else 3
    flat = w.reshape(-1, 256)
    nb = flat.shape[0]
    amax = np.abs(flat).max(axis=1)
    q = np.rint(flat / np.where(amax == 0, 1, amax)[:, None] * lim).astype(np.int64)
    q[(flat != 0) & (q == 0)] = 1  # keep every non-zero weight non-zero
    q = np.clip(q, -lim - 1, lim)
    scales = rng.integers(1, 20, (nb, 16))
    d = np.full(nb, 0.01)
    blocks = q6_k_blocks(q, scales, d) if qtype == "Q6_K" else q3_k_blocks(q, scales, d)
    return blocks.reshape(rows, -1)


def encode(rng: np.random.Generator, w: np.ndarray, qtype: str) -> np.ndarray:
    """Tensor bytes of `w` in `qtype` as gguf-py would store them (uint8 (rows, row_bytes) or float)."""
    if qtype == "F32":
        return w.astype(np.float32)
    if qtype in ("Q6_K", "Q3_K"):
        return k_quant(rng, w, qtype)
    return gguf.quants.quantize(w, gguf.GGMLQuantizationType[qtype])


def write_gguf(path: Path, tensors: list[tuple[str, np.ndarray, str]], alignment: int | None = None,
               extra_meta: bool = True) -> Path:
    """A GGUF with a few metadata keys (scalars, strings, arrays) and the given tensors."""
    writer = gguf.GGUFWriter(str(path), "llama")
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    if extra_meta:
        writer.add_name("tiny-pack-test")
        writer.add_block_count(2)
        writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(40)])
        writer.add_array("test.floats", [0.5, 1.5, 2.5])
    for name, data, qtype in tensors:
        if qtype == "F32":
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
