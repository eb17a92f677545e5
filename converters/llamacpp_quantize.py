"""Quantize a GGUF with llama.cpp's own quantizer (K-quants, mixes, importance matrix, overrides).

gguf-py cannot write K-quants; llama.cpp's ``llama_model_quantize`` can, with per-tensor type
overrides (regular expressions on tensor names) and an importance matrix passed as
``(tensor name, per-column weights)`` pairs.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from dsnot_deploy.errors import DsnotError

logger = logging.getLogger(__name__)


def llamacpp_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    overrides: tuple[tuple[str, GGMLQuantizationType], ...] = (),
    pure: bool = False,
    nthread: int = 0,
) -> None:
    """Run llama.cpp's quantizer from ``src`` (F32/F16/BF16 GGUF) to ``dst``; raise on failure."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise DsnotError(f"llama-cpp-python is needed for K-quant types: {exc}") from None

    from .llamacpp_log import route_llamacpp_logs

    route_llamacpp_logs()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = nthread
    params.pure = pure
    keep_alive: list[object] = []  # C strings and arrays must outlive the call
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            arr = np.ascontiguousarray(values, dtype=np.float32)
            if not np.all(np.isfinite(arr)):
                raise DsnotError(f"importance matrix entry {name} holds non-finite values")
            cname = name.encode()
            keep_alive += [arr, cname]
            entries[i].name = cname
            entries[i].data = arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entries[i].size = arr.size
        entries[len(imatrix)].name = None
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    if overrides:
        table = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, qtype) in enumerate(overrides):
            cpat = pattern.encode()
            keep_alive.append(cpat)
            table[i].pattern = cpat
            table[i].type = int(qtype)
        table[len(overrides)].pattern = None
        keep_alive.append(table)
        params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    logger.info("llama.cpp quantize %s -> %s (ftype %d, %d imatrix entries, %d overrides)",
                src.name, dst.name, ftype, len(imatrix or {}), len(overrides))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise DsnotError(f"llama.cpp's quantizer failed (code {rc}) converting {src.name}")
