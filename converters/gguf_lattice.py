"""Q4_0 / Q5_0 blocks written for values that already sit on the type's lattice, at any fp16 scale.

ggml's quantizer picks a block's scale from its largest-magnitude value (``d = m / -8`` for Q4_0,
``m / -16`` for Q5_0).  Values placed on the lattice with another scale (``quant.gptq``'s searched
scales) are ``k * d16`` with integer levels ``k`` but a largest level that need not be the anchor, so
ggml would round them a second time.  This module finds, per block, an fp16 scale and levels that
reproduce such values bit for bit and writes ggml's block bytes directly; every other block keeps
ggml's own encoding (byte-identical to gguf-py's quantizer).  `export` uses it for checkpoints whose
manifest records in-refinement quantization (the search costs several times ggml's encoding on
bf16 weights, which pass the cheap test below).

A block is on a lattice at scale ``d`` (fp16) iff every value is ``k * d`` in float32 with ``lo <= k
<= hi``; its largest magnitude is then ``|d| * K`` for some ``K`` in ``1 .. -lo``, so trying
``d = +-m / K`` for each ``K`` finds a reproducing scale whenever one exists (any two reproducing
pairs dequantize to the same values).  Values of ``fp16 * small integer`` have at most 16
significant bits, so a block with a value whose low 7 mantissa bits are set is skipped unsearched.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import quants

logger = logging.getLogger(__name__)

BLOCK = 32
PROBE = 4  # columns tried first per candidate scale
LEVELS: dict[Q, tuple[int, int]] = {Q.Q4_0: (-8, 7), Q.Q5_0: (-16, 15)}


def _same(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per block (rows of 32): every value bit-identical, +0.0 and -0.0 taken as equal."""
    return np.all((a + np.float32(0.0)).view(np.uint32) == (b + np.float32(0.0)).view(np.uint32), axis=1)


def find_levels(blocks: np.ndarray, qtype: Q) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For ``blocks`` (n, 32) float32: (found (n,) bool, fp16 scales (n,), int levels (n, 32)) such
    that ``levels * float32(scale) == blocks`` exactly where ``found``."""
    lo, hi = LEVELS[qtype]
    n = blocks.shape[0]
    found = np.zeros(n, dtype=bool)
    scales = np.zeros(n, dtype=np.float16)
    levels = np.zeros((n, BLOCK), dtype=np.int8)
    coarse = np.any(blocks.view(np.uint32) & np.uint32(0x7F), axis=1) | ~np.all(np.isfinite(blocks), axis=1)
    todo = np.flatnonzero(~coarse)
    zero = np.all(blocks[todo] == 0, axis=1)
    found[todo[zero]] = True  # scale 0, levels 0
    todo = todo[~zero]
    if todo.size == 0:
        return found, scales, levels
    x = blocks[todo]
    m = np.abs(x).max(axis=1)
    probe = x[:, :PROBE]  # a cheap first test on a few columns; the survivors are checked in full
    for k in range(-lo, 0, -1):  # ggml's own scale (K = -lo) first: its blocks keep ggml's bytes
        for sign in (-1.0, 1.0):
            if todo.size == 0:
                break
            d16 = (np.float32(sign) * m / np.float32(k)).astype(np.float16)
            d = d16.astype(np.float32)
            with np.errstate(divide="ignore", invalid="ignore"):
                qp = np.rint(probe / d[:, None])
                cand = np.isfinite(d) & (d != 0) & np.all((qp >= lo) & (qp <= hi), axis=1)
                cand &= _same((qp * d[:, None]).astype(np.float32), probe)
                c = np.flatnonzero(cand)
                q = np.rint(x[c] / d[c, None])
            ok = np.all((q >= lo) & (q <= hi), axis=1) & _same((q * d[c, None]).astype(np.float32), x[c])
            hit = c[ok]
            found[todo[hit]] = True
            scales[todo[hit]] = d16[hit]
            levels[todo[hit]] = q[ok].astype(np.int8)
            keep = np.ones(todo.size, dtype=bool)
            keep[hit] = False
            todo, x, m, probe = todo[keep], x[keep], m[keep], probe[keep]
    return found, scales, levels


def pack_blocks(scales: np.ndarray, levels: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's block bytes (n, type size) for fp16 ``scales`` (n,) and int ``levels`` (n, 32)."""
    lo, _ = LEVELS[qtype]
    u = (levels.astype(np.int16) - lo).astype(np.uint8)  # 0 .. 15 or 0 .. 31
    first, second = u[:, :16], u[:, 16:]
    qs = (first & 0x0F) | ((second & 0x0F) << 4)
    d = scales.astype("<f2").view(np.uint8).reshape(-1, 2)
    if qtype == Q.Q4_0:
        return np.concatenate([d, qs], axis=1)
    bits = (u >> 4).astype(np.uint32)  # the fifth bit of levels 0..31, bit j of qh is element j
    qh = (bits << np.arange(BLOCK, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return np.concatenate([d, qh.astype("<u4").view(np.uint8).reshape(-1, 4), qs], axis=1)


def encode_exact(values: np.ndarray, qtype: Q) -> np.ndarray:
    """ggml's bytes for ``values`` (rows, cols) of a Q4_0 / Q5_0 tensor: gguf-py's (= ggml's) encoding,
    except blocks on the lattice at a scale ggml would not pick, which are written exactly (blocks ggml
    reproduces itself keep ggml's bytes: its scale is the first one tried)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    data = np.ascontiguousarray(quants.quantize(values, qtype)).view(np.uint8)
    if qtype not in LEVELS or values.size == 0:
        return data
    type_size = quants.GGML_QUANT_SIZES[qtype][1]
    found, scales, levels = find_levels(values.reshape(-1, BLOCK), qtype)
    if found.any():
        rows = data.reshape(-1, type_size).copy()
        rows[found] = pack_blocks(scales[found], levels[found], qtype)
        data = rows.reshape(data.shape)
    return data


def placed_on_lattice(manifest: Mapping[str, Any] | None, tensor_names: Iterable[str]) -> dict[str, Q]:
    """HF weight name -> ggml type, for the decoder Linears `refine --quantize` put on a lattice (the
    manifest's quantize record names each as "<layer>.<module path>")."""
    record = (manifest or {}).get("quantize") or {}
    placed = {r["name"]: Q[r["type"]] for r in record.get("linears", []) if r.get("type") in Q.__members__}
    out = {}
    for name in tensor_names:
        m = re.search(r"layers\.(\d+)\.(.+)\.weight$", name)
        if m and f"{m.group(1)}.{m.group(2)}" in placed:
            out[name] = placed[f"{m.group(1)}.{m.group(2)}"]
    return out


def log_lattice(zeros: list[Any]) -> None:
    """Say how many quantized decoder weights were written with no second rounding."""
    quantized = [z for z in zeros if z.type not in ("F32", "F16", "BF16")]
    if quantized:
        exact = sum(z.exact for z in quantized)
        logger.info("on lattice: %d of %d quantized decoder weights written with no second rounding%s", exact,
                    len(quantized), "" if exact in (0, len(quantized)) else " (the others were rounded by ggml)")
