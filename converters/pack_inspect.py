"""What a GGUF or a sparse pack holds: tensors, types, sparsity, detected pattern, metadata, sizes.

`inspect_gguf` reads one tensor at a time. Sparsity is the fraction of weights whose code is the
type's zero code (types that lose zeros report none); the pattern is "N:M" when every group of M
consecutive weights of every row holds at least N zeros (M = 4 tried before 8, N the smallest count
found) and N/M is at least 3/4 of the sparsity (so a random 50% mask that happens to have a zero in
every group of 8 is not called 1:8), "unstructured" when there are zeros otherwise, "dense" when
there are none.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.errors import UserInputError

from .gguf_read import read_gguf_layout
from .pack_blocks import LAYOUTS
from .pack_codecs import nm_min_zeros
from .sparse_pack import is_pack, read_pack_index, size_breakdown


def zero_pattern(zero: np.ndarray, row_len: int) -> str:
    if not zero.any():
        return "dense"
    sparsity = float(zero.mean())
    for m in (4, 8):
        nmin = nm_min_zeros(zero, row_len, m)
        if nmin >= 1 and nmin / m >= 0.75 * sparsity:  # the N:M structure explains most zeros
            return f"{nmin}:{m}"
    return "unstructured"


def inspect_gguf(path: Path) -> dict[str, Any]:
    layout = read_gguf_layout(path)
    tensors = []
    with open(path, "rb") as fh:
        for t in layout.tensors:
            row: dict[str, Any] = {"name": t.name, "type": t.type_name, "shape": list(t.shape),
                                   "bytes": t.nbytes, "sparsity": None, "pattern": None}
            lay = LAYOUTS.get(t.type_name)
            if lay is not None and t.nbytes and t.dims and t.dims[0] % lay.block_elems == 0:
                fh.seek(t.start)
                raw = np.frombuffer(fh.read(t.nbytes), np.uint8).reshape(-1, lay.block_bytes)
                zero = lay.split(raw)[1].reshape(-1) == lay.zero_code
                row["sparsity"] = float(zero.mean())
                row["pattern"] = zero_pattern(zero, t.dims[0])
            tensors.append(row)
    meta = [{"key": f.key, "type": f.type_name, "count": f.count, "value": f.value} for f in layout.metadata]
    return {"kind": "gguf", "path": str(path), "size": layout.file_size, "version": layout.version,
            "alignment": layout.alignment, "metadata": meta, "tensors": tensors}


def inspect_pack(path: Path) -> dict[str, Any]:
    header, descs, pack_size = read_pack_index(path)
    tensors = []
    for d in descs:
        if d.get("k") != "tensor":
            continue
        _check_tensor_desc(d, path)
        n = math.prod(d["dims"])
        row = {"name": d["name"], "type": d["type"], "shape": list(reversed(d["dims"])), "bytes": d["len"],
               "encoding": d.get("enc"), "mask": d.get("mask"),
               "nm": d.get("nm"), "sparsity": (d["zeros"] / n) if "zeros" in d and n else None,
               "stored": {s[0]: s[2] for s in d["s"]}}
        if "eb" in d:
            row["mask_entropy_bound_bits"], row["values_entropy_bits"] = d["eb"]
        tensors.append(row)
    return {"kind": "pack", "path": str(path), "size": pack_size, "format_version": header.version,
            "original_size": header.original_size, "original_sha256": header.sha256,
            "records": len(descs), "breakdown": size_breakdown(descs, pack_size), "tensors": tensors}


def _check_tensor_desc(d: dict[str, Any], path: Path) -> None:
    """UserInputError unless the descriptor fields that inspect shows have the types it formats
    (unpack checks what it decodes; these are informative fields a corrupt pack may garble)."""
    def is_int(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    ok = (isinstance(d.get("name"), str) and isinstance(d.get("type"), str)
          and isinstance(d.get("dims"), list) and all(is_int(x) for x in d["dims"])
          and (d.get("enc") == "raw" or (d.get("enc") == "sparse" and isinstance(d.get("mask"), str)))
          and (d.get("mask") != "nm" or (isinstance(d.get("nm"), list) and len(d["nm"]) == 2))
          and ("zeros" not in d or is_int(d["zeros"]))
          and ("eb" not in d or (isinstance(d["eb"], list) and len(d["eb"]) == 2
                                 and all(isinstance(x, (int, float)) for x in d["eb"]))))
    if not ok:
        raise UserInputError(f"{path}: corrupt pack: tensor record {str(d.get('name'))[:80]!r} has malformed "
                             f"fields (name, type, dims, enc, mask, nm, zeros or eb)")


def inspect_file(path: Path) -> dict[str, Any]:
    return inspect_pack(path) if is_pack(path) else inspect_gguf(path)


def _value_text(v: Any, count: int, width: int = 60) -> str:
    def cut(text: str) -> str:
        return text if len(text) <= width else text[: width - 3] + "..."

    if isinstance(v, list):
        items = ", ".join(repr(x) for x in v)
        return f"[{cut(items + (', ...' if count > len(v) else ''))}] ({count} items)"
    return cut(repr(v))


def format_report(info: dict[str, Any], metadata: bool = True) -> str:
    lines: list[str] = []
    if info["kind"] == "gguf":
        lines.append(f"{info['path']}: GGUF v{info['version']}, {info['size']:,} bytes, "
                     f"{len(info['tensors'])} tensors, alignment {info['alignment']}")
        if metadata:
            lines.append("metadata:")
            lines += [f"  {m['key']} ({m['type']}) = {_value_text(m['value'], m['count'])}" for m in info["metadata"]]
        lines.append(f"{'tensor':<36} {'type':<6} {'shape':<16} {'bytes':>12} {'sparsity':>9} pattern")
        for t in info["tensors"]:
            sp = "-" if t["sparsity"] is None else f"{t['sparsity']:.4f}"
            lines.append(f"{t['name']:<36} {t['type']:<6} {'x'.join(map(str, t['shape'])):<16} "
                         f"{t['bytes'] if t['bytes'] is not None else '?':>12} {sp:>9} {t['pattern'] or '-'}")
        return "\n".join(lines)
    lines.append(f"{info['path']}: sparse pack v{info['format_version']}, {info['size']:,} bytes for a GGUF of "
                 f"{info['original_size']:,} bytes ({info['size'] / max(info['original_size'], 1):.3f}x), "
                 f"{info['records']} records, original sha256 {info['original_sha256']}")
    lines.append("size breakdown:")
    for k, v in info["breakdown"].items():
        lines.append(f"  {k:<9} {v:>12,} bytes ({v / max(info['size'], 1):6.1%})")
    lines.append(f"{'tensor':<36} {'type':<6} {'shape':<16} {'sparsity':>9} {'encoding':<14} "
                 f"{'stored':>10} {'mask':>9} {'values':>10} {'side':>8}")
    for t in info["tensors"]:
        sp = "-" if t["sparsity"] is None else f"{t['sparsity']:.4f}"
        enc = t["encoding"] if t["encoding"] == "raw" else (
            f"{t['nm'][0]}:{t['nm'][1]}" if t["mask"] == "nm" else t["mask"])
        st = t["stored"]
        lines.append(f"{t['name']:<36} {t['type']:<6} {'x'.join(map(str, t['shape'])):<16} {sp:>9} {enc:<14} "
                     f"{sum(st.values()):>10} {st.get('mask', 0):>9} {st.get('values', 0):>10} {st.get('side', 0):>8}")
    return "\n".join(lines)
