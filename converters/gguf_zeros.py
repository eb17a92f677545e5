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
        written = gguf.quants.dequantize(t.data, t.tensor_type).reshape(-1)
        src = source(name).reshape(-1)
        if src.size != written.size:
            raise ValueError(f"{name}: {written.size} values written, {src.size} in the checkpoint")
        was_zero = src == 0
        is_zero = written == 0
        same = np.array_equal((np.asarray(written, dtype=np.float32) + np.float32(0)).view(np.uint32),
                              (np.asarray(src, dtype=np.float32) + np.float32(0)).view(np.uint32))
        counts.append(ZeroCount(
            name=name,
            type=t.tensor_type.name,
            size=int(src.size),
            zeros_source=int(was_zero.sum()),
            zeros_kept=int((was_zero & is_zero).sum()),
            zeros_added=int((~was_zero & is_zero).sum()),
            exact=same,
        ))
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
