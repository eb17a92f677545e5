"""Shared pieces of the reliability tests: tiny inputs, folder snapshots, manifest comparison."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

TEXT = " ".join(
    f"Sentence number {i} tells the quick brown fox to jump over the lazy dog, hello world." for i in range(200)
)

# sparsity.json fields that are wall-clock measurements (dsnot_deploy.layerwise.refine.TIME_FIELDS)
TIME_PATHS = ("times", "sparsity.per_layer[].seconds", "linears[].mask_seconds")


def refine_args(ckpt: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", str(ckpt), str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "-q", *extra]


def tree_hashes(root: Path) -> dict[str, str]:
    """SHA-256 of every file under `root` (relative path -> hex)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def listing(root: Path) -> list[str]:
    """Every path under `root`, hidden ones included (a temporary left behind shows up)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def json_diff_paths(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two JSON values differ; list indices are written as [] (one path per field)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            sub = f"{path}.{key}" if path else key
            if key not in a or key not in b:
                out.append(sub)
            else:
                out.extend(json_diff_paths(a[key], b[key], sub))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for x, y in zip(a, b):
            out.extend(json_diff_paths(x, y, f"{path}[]"))
        return sorted(set(out))
    return [] if a == b else [path]


def is_time_path(path: str) -> bool:
    return any(path == t or path.startswith(t + ".") for t in TIME_PATHS)


def assert_same_checkpoint(a: Path, b: Path) -> None:
    """Every file byte-identical, except sparsity.json where only the documented time fields may differ."""
    ha, hb = tree_hashes(a), tree_hashes(b)
    assert sorted(ha) == sorted(hb)
    different = [name for name in ha if ha[name] != hb[name]]
    assert set(different) <= {"sparsity.json"}, different
    ma, mb = (json.loads((d / "sparsity.json").read_text()) for d in (a, b))
    diff = json_diff_paths(ma, mb)
    assert all(is_time_path(p) for p in diff), [p for p in diff if not is_time_path(p)]
