"""The legacy compressed-tensors `sparse-bitmask` / `sparse-24-bitmask` checkpoint layout.

compressed-tensors <= 0.14 loads these (0.15.0 removed them). For a weight `P.weight` the file holds
- `P.shape`: int64 [rows, cols];
- `P.compressed`: the kept values in the weight's dtype, row-major; 1-D for sparse-bitmask,
  [rows, cols / 2] for sparse-24-bitmask (exactly two per group of four);
- `P.bitmask`: uint8 [rows, ceil(cols / 8)], `np.packbits(kept, axis=-1, bitorder="little")`;
- `P.row_offsets` (sparse-bitmask only): int64 [rows], exclusive prefix sum of kept per row.
config.json gets `quantization_config = {"quant_method": "compressed-tensors", "version": "0.14.0",
"sparsity_config": {"format": FORMAT, ...}}`, what compressed-tensors' `ModelCompressor.update_config`
writes for a sparse-only model (any other top-level key would be taken for a quantization scheme
and refused on load). Other tensors are stored as they are.

"Kept" is every weight whose bit pattern is not all zeros, so -0.0 is stored as a value and the
round trip is bit-exact. In 2:4 groups with fewer than two non-zeros, the first zero slots fill
the group (their value 0 is stored). Only 2-D `*.weight` tensors with zeros that are not
embeddings or `lm_head` are compressed (the Linears compressed-tensors targets), and for 2:4 only
those with at most two non-zeros in every group of four along rows.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.atomic import atomic_dir
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.progress import Progress, track

log = logging.getLogger(__name__)

FORMATS = ("sparse-bitmask", "sparse-24-bitmask")
WEIGHTS_NAME = "model.safetensors"
SUFFIXES = ("shape", "compressed", "bitmask", "row_offsets")


def _load_state(ckpt: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    files = sorted(ckpt.glob("*.safetensors"))
    if not ckpt.is_dir() or not files:
        raise UserInputError(f"expected a checkpoint directory with *.safetensors, found {ckpt}")
    state: dict[str, Any] = {}
    for f in files:
        try:
            part = load_file(str(f))
        except Exception as exc:  # noqa: BLE001 - safetensors raises several types on bad files
            raise UserInputError(f"{f}: not a readable safetensors file ({exc})") from None
        dup = state.keys() & part.keys()
        if dup:
            raise UserInputError(f"{f}: tensor {min(dup)!r} also appears in another file")
        state.update(part)
    return state


def _read_config(ckpt: Path) -> dict[str, Any]:
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise UserInputError(f"expected {cfg_path}, found no file")
    try:
        return json.loads(cfg_path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{cfg_path}: not JSON ({exc})") from None


def _int_view(t: Any) -> Any:
    import torch

    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def kept_mask(t: Any) -> Any:
    """Bool mask of weights whose bits are not all zero (so -0.0 is kept)."""
    return _int_view(t) != 0


def mask_24(kept: Any) -> Any | None:
    """Exactly two kept per group of four (non-zeros first, then the first zero slots), or None."""
    import torch

    g = kept.reshape(-1, 4)
    if (g.sum(dim=1) > 2).any():
        return None
    fill = (~g) & (torch.cumsum((~g).int(), dim=1) <= (2 - g.sum(dim=1, keepdim=True)))
    return (g | fill).reshape(kept.shape)


def pack_bits(mask: Any) -> Any:
    import torch

    return torch.from_numpy(np.packbits(mask.numpy(), axis=-1, bitorder="little"))


def unpack_bits(bitmask: Any, rows: int, cols: int) -> Any:
    import torch

    bits = np.unpackbits(bitmask.numpy(), axis=-1, count=cols, bitorder="little")
    if bits.shape != (rows, cols):
        raise UserInputError(f"bitmask of shape {tuple(bitmask.shape)} does not fit a {rows}x{cols} weight")
    return torch.from_numpy(bits.astype(bool))


def compress_weight(w: Any, structure: str) -> dict[str, Any] | None:
    """The layout's tensors for one 2-D weight (keys are suffixes), or None to keep it dense."""
    import torch

    rows, cols = w.shape
    kept = kept_mask(w)
    if bool(kept.all()):
        return None
    if structure == "sparse-24-bitmask":
        if cols % 4:
            return None
        kept = mask_24(kept)
        if kept is None:
            return None
    values = w[kept]
    out = {"shape": torch.tensor([rows, cols], dtype=torch.int64),
           "compressed": values.reshape(rows, cols // 2) if structure == "sparse-24-bitmask" else values,
           "bitmask": pack_bits(kept)}
    if structure == "sparse-bitmask":
        counts = kept.sum(dim=1, dtype=torch.int64)
        out["row_offsets"] = torch.cumsum(counts, 0) - counts
    return out


def decompress_weight(parts: dict[str, Any], structure: str, name: str) -> Any:
    import torch

    try:
        rows, cols = (int(x) for x in parts["shape"].reshape(-1).tolist())
        mask = unpack_bits(parts["bitmask"], rows, cols)
        values = parts["compressed"].reshape(-1)
        if int(mask.sum()) != values.numel():
            raise UserInputError(f"{name}: bitmask keeps {int(mask.sum())} weights, compressed holds {values.numel()}")
        if structure == "sparse-bitmask" and "row_offsets" in parts:
            counts = mask.sum(dim=1, dtype=torch.int64)
            if not torch.equal(parts["row_offsets"].reshape(-1), torch.cumsum(counts, 0) - counts):
                raise UserInputError(f"{name}: row_offsets do not match the bitmask")
    except KeyError as exc:
        raise UserInputError(f"{name}: missing {exc.args[0]!r} of the {structure} layout") from None
    except (ValueError, RuntimeError) as exc:
        raise UserInputError(f"{name}: malformed {structure} tensors ({exc})") from None
    dense = torch.zeros((rows, cols), dtype=values.dtype)
    dense[mask] = values
    return dense


def is_linear_weight(name: str, t: Any) -> bool:
    """2-D `*.weight` that is not an embedding or the output head (the Linears the tools target)."""
    return t.dim() == 2 and name.endswith(".weight") and "embed" not in name and "lm_head" not in name


def _copy_other_files(src: Path, dst: Path) -> None:
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy2(f, dst / f.name)


def pack_bitmask_checkpoint(ckpt: Path, outdir: Path, *, structure: str = "sparse-bitmask", force: bool = False,
                            progress: Progress = False) -> dict[str, Any]:
    """Write `outdir`: `ckpt` with its sparse 2-D weights in the legacy bitmask layout."""
    from safetensors.torch import save_file

    if structure not in FORMATS:
        raise UserInputError(f"format must be one of {FORMATS}, found {structure!r}")
    ckpt, outdir = Path(ckpt), Path(outdir)
    config = _read_config(ckpt)
    if "quantization_config" in config:
        raise UserInputError(f"{ckpt}/config.json already has a quantization_config; expected a dense checkpoint")
    state = _load_state(ckpt)
    out: dict[str, Any] = {}
    targets: list[str] = []
    zeros = total = before = 0
    for name in track(progress, sorted(state), structure):
        t = state[name].contiguous()
        before += t.numel() * t.element_size()
        parts = compress_weight(t, structure) if is_linear_weight(name, t) else None
        if parts is None:
            out[name] = t
            continue
        prefix = name[: -len(".weight")]
        targets.append(prefix)
        zeros += int((~kept_mask(t)).sum())
        total += t.numel()
        for k, v in parts.items():
            out[f"{prefix}.{k}"] = v.contiguous()
    if not targets:
        raise UserInputError(f"{ckpt}: no 2-D weight fits {structure} (no zeros"
                             f"{', or not 2:4' if structure == 'sparse-24-bitmask' else ''}); nothing to compress")
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "version": "0.14.0",
        "sparsity_config": {
            "format": structure,
            "global_sparsity": zeros / total,
            "sparsity_structure": "2:4" if structure == "sparse-24-bitmask" else "unstructured",
            "targets": targets,
            "ignore": [],
            "registry_requires_subclass": False,
        },
    }
    with atomic_dir(outdir, force) as tmp:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_other_files(ckpt, tmp)
        after = (tmp / WEIGHTS_NAME).stat().st_size
    return {"compressed_tensors": len(targets), "bytes_before": before, "bytes_after": after}


def unpack_bitmask_checkpoint(ckpt: Path, outdir: Path, *, force: bool = False, progress: Progress = False) -> int:
    """Write `outdir`: the dense-with-zeros checkpoint of a sparse-bitmask / sparse-24-bitmask one."""
    from safetensors.torch import save_file

    ckpt, outdir = Path(ckpt), Path(outdir)
    config = _read_config(ckpt)
    qc = config.get("quantization_config")
    structure = (qc or {}).get("sparsity_config", {}).get("format") if isinstance(qc, dict) else None
    if structure not in FORMATS:
        raise UserInputError(f"{ckpt}/config.json: expected quantization_config.sparsity_config.format in "
                             f"{FORMATS}, found {structure!r}")
    state = _load_state(ckpt)
    prefixes = sorted(k[: -len(".bitmask")] for k in state if k.endswith(".bitmask"))
    out: dict[str, Any] = {}
    used: set[str] = set()
    for prefix in track(progress, prefixes, "unpack"):
        parts = {s: state[f"{prefix}.{s}"] for s in SUFFIXES if f"{prefix}.{s}" in state}
        used.update(f"{prefix}.{s}" for s in parts)
        name = f"{prefix}.weight"
        if name in state:
            raise UserInputError(f"{ckpt}: {name} is stored both dense and compressed")
        out[name] = decompress_weight(parts, structure, name)
    for k, v in state.items():
        if k not in used:
            out[k] = v
    del config["quantization_config"]
    with atomic_dir(outdir, force) as tmp:
        save_file(out, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _copy_other_files(ckpt, tmp)
    return len(prefixes)
