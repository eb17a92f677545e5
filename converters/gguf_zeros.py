"""Did the pruned zeros survive?  Read the written GGUF back and compare with the checkpoint.

For every GGUF weight that came from a checkpoint tensor, the checkpoint's exact zeros are the
pruned positions.  The GGUF tensor is dequantized (gguf-py; K-quants included) and we count how many
of those positions are still exactly zero, how many new zeros quantization created, and whether
every value came back bit for bit (a checkpoint already on the type's lattice, e.g. from
``refine --quantize``, is written with no second rounding; the sign of a zero is not compared).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class ZeroCount:
    name: str
    type: str
    size: int
    zeros_source: int
    zeros_kept: int
    zeros_added: int
    exact: bool = False  # every written value equals the checkpoint's (zeros' signs aside)

    @property
    def kept_fraction(self) -> float:
        return 1.0 if self.zeros_source == 0 else self.zeros_kept / self.zeros_source

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "kept_fraction": self.kept_fraction}


def same_values(written: np.ndarray, src: np.ndarray) -> bool:
    """Every written value equals its source bit for bit, zeros' signs aside (NaNs compared by bits)."""
    if np.array_equal(written, src):  # equal as floats: equal bits once zeros' signs are ignored
        return True
    return bool(np.isnan(src).any()) and np.array_equal(
        (np.asarray(written, dtype=np.float32) + np.float32(0)).view(np.uint32),
        (np.asarray(src, dtype=np.float32) + np.float32(0)).view(np.uint32))


class ZeroTally:
    """A ZeroCount built from a tensor's rows, chunk by chunk (the export streams; memory stays one chunk)."""

    def __init__(self, name: str, type_name: str) -> None:
        self.name, self.type = name, type_name
        self.size = self.zeros_source = self.zeros_kept = self.zeros_added = 0
        self.exact = True

    def add(self, src: np.ndarray, written: np.ndarray) -> None:
        """``src``: checkpoint values (float32, after the export's rewrites); ``written``: the same positions
        as stored in the file, dequantized to float32."""
        src, written = src.reshape(-1), written.reshape(-1)
        if src.size != written.size:
            raise ValueError(f"{self.name}: {written.size} values written, {src.size} in the checkpoint")
        self.add_masks(src == 0, written == 0, lambda: same_values(written, src))

    def add_masks(self, was_zero: np.ndarray, is_zero: np.ndarray, exact: Callable[[], bool]) -> None:
        """Zero masks of the checkpoint's values and of the written ones (same positions); ``exact()``
        says whether every written value equals its source (called only while no chunk has differed)."""
        if was_zero.size != is_zero.size:
            raise ValueError(f"{self.name}: {is_zero.size} values written, {was_zero.size} in the checkpoint")
        kept = int(np.count_nonzero(was_zero & is_zero))
        self.size += int(was_zero.size)
        self.zeros_source += int(np.count_nonzero(was_zero))
        self.zeros_kept += kept
        self.zeros_added += int(np.count_nonzero(is_zero)) - kept
        if self.exact:
            self.exact = exact()

    def add_identical(self, size: int, zeros: int) -> None:
        """``size`` values written exactly as stored (a float tensor in its own width), ``zeros`` of them zero."""
        self.size += size
        self.zeros_source += zeros
        self.zeros_kept += zeros

    def result(self) -> ZeroCount:
        return ZeroCount(name=self.name, type=self.type, size=self.size, zeros_source=self.zeros_source,
                         zeros_kept=self.zeros_kept, zeros_added=self.zeros_added, exact=self.exact)


def count_zeros(
    reader: Any,
    names: Iterable[str],
    source: Callable[[str], np.ndarray],
) -> list[ZeroCount]:
    """One ZeroCount per tensor of ``reader`` (a ``gguf.GGUFReader`` of the written file) in ``names``;
    ``source(name)`` gives the written values' origin.

    ``source`` returns the checkpoint tensor after the same rewrites as the export (permutation),
    in GGUF's row-major layout, so positions correspond one to one.
    """
    import gguf

    by_name = {t.name: t for t in reader.tensors}
    counts = []
    for name in names:
        t = by_name[name]
        tally = ZeroTally(name, t.tensor_type.name)
        tally.add(source(name), gguf.quants.dequantize(t.data, t.tensor_type))
        counts.append(tally.result())
    return counts


def summarize(counts: list[ZeroCount]) -> dict[str, Any]:
    zs = sum(c.zeros_source for c in counts)
    kept = sum(c.zeros_kept for c in counts)
    return {
        "tensors": len(counts),
        "zeros_in_checkpoint": zs,
        "zeros_kept": kept,
        "zeros_added_by_quantization": sum(c.zeros_added for c in counts),
        "kept_fraction": 1.0 if zs == 0 else kept / zs,
        "tensors_fully_kept": sum(c.zeros_kept == c.zeros_source for c in counts),
        "tensors_written_exactly": sum(c.exact for c in counts),
    }
