"""Quantize a GGUF with llama.cpp's own quantizer (K-quants, mixes, importance matrix, overrides).

gguf-py cannot write K-quants; llama.cpp's ``llama_model_quantize`` can, with per-tensor type
overrides (regular expressions on tensor names) and an importance matrix passed as
``(tensor name, per-column weights)`` pairs.

llama.cpp replaces a type whose block does not divide a tensor's rows by one of its own choosing and only
says so in its log; ``llamacpp_quantize`` reads those lines while it runs and returns them as
``LlamacppFallback`` records, so the caller can report them (the written file is the final word).
"""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from dsnot_deploy.errors import DsnotError

from .gguf_types import TensorTypeChoice

logger = logging.getLogger(__name__)

_NATIVE_LOGGER = "llama_cpp.native"  # where converters.llamacpp_log routes llama.cpp's lines
# llama.cpp (llama-quant.cpp, tensor_type_fallback) logs a fallback in two pieces:
#   "warning: blk.0.attn_q.weight - ncols 576 not divisible by 256 (required for type q3_K)"
#   "-> falling back to q4_0"
_FALLBACK_START = re.compile(r"(\S+)\s+-\s+ncols\s+(\d+)\s+not divisible by\s+(\d+)\s+\(required for type\s+(\w+)\)")
_FALLBACK_END = re.compile(r"falling back to\s+(\w+)")


@dataclass(frozen=True)
class LlamacppFallback:
    """A tensor llama.cpp wrote in another type than the one it meant, as its log says (type names upper-case,
    as gguf-py spells them: ``Q3_K``, ``Q4_0``, ``F16``)."""

    name: str
    ncols: int
    block: int
    intended: str
    written: str

    def as_choice(self) -> TensorTypeChoice:
        reason = f"rows {self.ncols} not a multiple of {self.block} ({self.intended} block size)"
        return TensorTypeChoice(self.name, self.intended, self.written, reason, decided_by="llama.cpp")


class _FallbackCollector(logging.Handler):
    """Collects llama.cpp's fallback lines; passes on to the parent loggers' handlers the records at or above
    ``forward_level`` (what they received before the collector was attached), none when ``forward_level`` is
    None."""

    def __init__(self, forward_level: int | None) -> None:
        super().__init__(logging.DEBUG)
        self.forward_level = forward_level
        self.found: list[LlamacppFallback] = []
        self._pending: tuple[str, int, int, str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        start = _FALLBACK_START.search(message)
        if start is not None:
            name, ncols, block, intended = start.groups()
            self._pending = (name, int(ncols), int(block), intended.upper())
        end = _FALLBACK_END.search(message)
        if end is not None and self._pending is not None:
            self.found.append(LlamacppFallback(*self._pending, written=end.group(1).upper()))
            self._pending = None
        parent = logging.getLogger(_NATIVE_LOGGER).parent
        if self.forward_level is not None and record.levelno >= self.forward_level and parent is not None:
            parent.handle(record)


@contextmanager
def _collect_fallbacks() -> Iterator[_FallbackCollector]:
    """Read llama.cpp's DEBUG lines while quantizing without showing them where they were not shown before:
    the native logger is lowered to DEBUG and stops propagating; the collector forwards what its old
    effective level let through."""
    native = logging.getLogger(_NATIVE_LOGGER)
    level, propagate = native.level, native.propagate
    collector = _FallbackCollector(native.getEffectiveLevel() if propagate else None)
    native.addHandler(collector)
    native.setLevel(logging.DEBUG)
    native.propagate = False
    try:
        yield collector
    finally:
        native.removeHandler(collector)
        native.setLevel(level)
        native.propagate = propagate


def llamacpp_quantize(
    src: Path,
    dst: Path,
    ftype: int,
    *,
    imatrix: Mapping[str, np.ndarray] | None = None,
    overrides: tuple[tuple[str, GGMLQuantizationType], ...] = (),
    pure: bool = False,
    nthread: int = 0,
) -> list[LlamacppFallback]:
    """Run llama.cpp's quantizer from ``src`` (F32/F16/BF16 GGUF) to ``dst``; raise on failure.

    ``overrides``: (regular expression on tensor names, type) pairs; llama.cpp applies the first that
    matches (exact names, ``^name$``, make the order irrelevant).  Returns the tensors llama.cpp says it
    wrote in a fallback type because their rows do not fit the block of the type it meant."""
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
    with _collect_fallbacks() as collector:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise DsnotError(f"llama.cpp's quantizer failed (code {rc}) converting {src.name}")
    return collector.found
