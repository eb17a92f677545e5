"""Importance matrices for llama.cpp's quantizer, from our calibration statistics or llama.cpp's files.

llama.cpp's importance matrix holds, per weight tensor, the mean over calibration tokens of x_j^2
for every input column j - exactly Wanda's statistic ``sqnorm_j / n_tokens``.  `dsnot-deploy refine`
saves it as ``calibration_stats.safetensors`` (one float32 vector per Linear, keyed by module
name); ``llama-imatrix`` writes GGUF files with ``<tensor>.in_sum2`` and ``<tensor>.counts``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.errors import UserInputError


def imatrix_from_stats(stats: dict[str, np.ndarray], gguf_name: Callable[[str], str | None]) -> dict[str, np.ndarray]:
    """Map per-module vectors to GGUF weight names (``blk.0.attn_q.weight``); unknown names are dropped."""
    out: dict[str, np.ndarray] = {}
    for module, values in stats.items():
        name = gguf_name(module + ".weight")
        if name is not None:
            out[name] = np.asarray(values, dtype=np.float32).reshape(-1)
    return out


def read_imatrix_file(path: Path) -> dict[str, np.ndarray]:
    """Read an importance matrix: llama.cpp's GGUF imatrix, or our safetensors statistics file.

    Our file is keyed by HF module names; callers map it with ``imatrix_from_stats``.  The GGUF
    format is keyed by GGUF tensor names already: in_sum2 / counts per column.
    """
    if not path.is_file():
        raise UserInputError(f"importance matrix {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: v.astype(np.float32) for k, v in load_file(path).items()}
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - any parse error means not an imatrix file
        raise UserInputError(f"{path} is neither a safetensors statistics file nor a GGUF imatrix: {exc}") from None
    sums = {t.name[: -len(".in_sum2")]: np.asarray(t.data, dtype=np.float64) for t in reader.tensors
            if t.name.endswith(".in_sum2")}
    counts = {t.name[: -len(".counts")]: np.asarray(t.data, dtype=np.float64) for t in reader.tensors
              if t.name.endswith(".counts")}
    if not sums:
        raise UserInputError(f"{path} holds no '<tensor>.in_sum2' entries: not a llama.cpp imatrix GGUF")
    out = {}
    for name, s in sums.items():
        n = counts.get(name)
        if n is None or n.size == 0 or float(n.reshape(-1)[0]) <= 0:
            raise UserInputError(f"{path}: {name} has no positive '.counts' entry")
        out[name] = (s.reshape(-1) / float(n.reshape(-1)[0])).astype(np.float32)
    return out


def load_export_imatrix(setting: str, load_stats: Callable[[], Any],
                        gguf_name: Callable[[str], str | None]) -> tuple[dict[str, np.ndarray], str]:
    """`export --imatrix` SETTING: "none", "auto" (the checkpoint's calibration statistics, ``load_stats()``,
    if any) or a file; (GGUF name -> importance, where it came from)."""
    if setting == "none":
        return {}, "none"
    if setting == "auto":
        stats = load_stats()
        return imatrix_from_stats(stats, gguf_name), ("calibration_stats.safetensors" if stats else "none")
    path = Path(setting)
    data = read_imatrix_file(path)
    if path.suffix == ".safetensors":
        data = imatrix_from_stats(data, gguf_name)
    return data, str(path)
