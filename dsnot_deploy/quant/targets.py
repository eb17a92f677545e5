"""What in-refinement quantization aims at: one lattice type, or a sparsity-safe preset's per-tensor plan.

``--quantize Q4_0`` puts every decoder Linear on Q4_0's lattice.  ``--quantize SPARSE_Q4`` follows the
preset `export --type SPARSE_Q4` writes (``converters.gguf_types``): each Linear on the lattice of the
type the preset plans for it (Q4_0 for most; Q8_0 where a Q6_K tensor falls back because its rows
are not whole 256-blocks), and Linears planned at a type without a lattice here (Q6_K, Q3_K) left in
float for llama.cpp's quantizer at export.
"""

from __future__ import annotations

import re

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.quant.lattice import LATTICES, Lattice

PRESETS = {"SPARSE_Q4": "Q4_0", "SPARSE_Q5": "Q5_0"}  # preset -> the lattice of its base tensors
TARGETS = (*LATTICES, *PRESETS)


def parse_target(name: str) -> str:
    """The canonical target name (case-insensitive); the error lists the choices."""
    key = name.strip().upper().replace("-", "_")
    if key not in TARGETS:
        raise UserInputError(f"expected a quant type among {', '.join(TARGETS)} for in-refinement quantization; "
                             f"found {name!r}")
    return key


def base_lattice(target: str) -> Lattice:
    key = parse_target(target)
    return LATTICES[PRESETS.get(key, key)]


def gguf_weight_name(linear: str) -> str | None:
    """``"3.self_attn.v_proj"`` (layer index, module path in the layer) -> ``"blk.3.attn_v.weight"``, by
    gguf-py's table of Hugging Face names (None for a name it does not know)."""
    import gguf

    m = re.fullmatch(r"(\d+)\.(.+)", linear)
    if m is None:
        return None
    index = int(m.group(1))
    name = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, index + 1).get_name(f"model.layers.{index}.{m.group(2)}")
    return f"{name}.weight" if name else None


def lattice_for(target: str, linear: str, cols: int) -> Lattice | None:
    """The lattice of one Linear (``linear`` as ``gguf_weight_name`` takes it, rows of ``cols``), or None
    when the target plans a type without one here."""
    key = parse_target(target)
    if key in LATTICES:
        return LATTICES[key]
    from converters.gguf_types import OUTPUT_TYPES, plan_tensor_type

    name = gguf_weight_name(linear)
    if name is None:  # a Linear the preset has no rule for gets its base type
        return base_lattice(key)
    return LATTICES.get(plan_tensor_type(OUTPUT_TYPES[key], name, cols).written)
