"""The block lattices of ggml's legacy quant types, and ggml's own round-to-nearest onto them.

A row of a Q8_0 / Q5_0 / Q4_0 tensor is cut along the input dimension into blocks of 32 weights;
a block stores one fp16 scale ``d`` and integer levels ``k``, and dequantizes to ``k * d``:

=====  ==============  ===========================================================
type   levels ``k``     ggml's scale rule (``m``: the block weight of largest |w|)
=====  ==============  ===========================================================
Q8_0   -127 .. 127      ``d = |m| / 127``, ``k = round(w / d)``
Q5_0   -16 .. 15        ``d = m / -16``, ``k = trunc(w / d + 16.5) - 16``
Q4_0   -8 .. 7          ``d = m / -8``, ``k = trunc(w / d + 8.5) - 8``
=====  ==============  ===========================================================

ggml divides by the float32 ``d`` and stores ``fp16(d)``.  A block whose values are ``k * d16``
with its largest-|w| value at the *anchor* level (``-8``, ``-16``, or ``+-127``) is reproduced
exactly by ggml's quantizer: ``m / anchor`` is then ``d16`` itself.  The GPTQ sweep
(``quant.gptq``) only produces such blocks, so `export` writes them with no second rounding.
Pruned weights are level 0, which every type here has: zeros stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType, quants

from dsnot_deploy.errors import UserInputError


@dataclass(frozen=True)
class Lattice:
    """One ggml block type: ``block`` weights per scale, levels ``lo .. hi``, and the ``anchor``
    level of a block's largest-magnitude weight (scale = that weight / anchor)."""

    name: str
    qtype: GGMLQuantizationType
    block: int
    lo: int
    hi: int
    anchor: int

    def check_width(self, cols: int) -> None:
        if cols % self.block:
            raise UserInputError(f"{self.name} needs rows whose length is a multiple of {self.block}; found {cols}")


LATTICES: dict[str, Lattice] = {
    "Q8_0": Lattice("Q8_0", GGMLQuantizationType.Q8_0, 32, -127, 127, 127),
    "Q5_0": Lattice("Q5_0", GGMLQuantizationType.Q5_0, 32, -16, 15, -16),
    "Q4_0": Lattice("Q4_0", GGMLQuantizationType.Q4_0, 32, -8, 7, -8),
}


def parse_lattice(name: str) -> Lattice:
    """Look a lattice up by type name (case-insensitive); the error lists the choices."""
    key = name.strip().upper().replace("-", "_")
    if key not in LATTICES:
        raise UserInputError(f"expected a quant type among {', '.join(LATTICES)} for in-refinement quantization; "
                             f"found {name!r}")
    return LATTICES[key]


def ggml_round_trip(weight: torch.Tensor | np.ndarray, lattice: Lattice) -> np.ndarray:
    """What llama.cpp reads back after ggml quantizes ``weight`` (rows, cols) to ``lattice``:
    gguf-py's reference quantizer (bit-exact with ggml-quants.c), then dequantization; float32."""
    arr = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    lattice.check_width(arr.shape[-1])
    return quants.dequantize(quants.quantize(arr, lattice.qtype), lattice.qtype).astype(np.float32).reshape(arr.shape)


def is_on_lattice(weight: torch.Tensor | np.ndarray, lattice: Lattice) -> bool:
    """True when `export` writes ``weight`` of a quantized checkpoint with no second rounding: the bytes
    it encodes (ggml's, or an on-lattice block at its own fp16 scale, ``converters.gguf_lattice``)
    dequantize to it bit for bit."""
    from converters.gguf_stream import decode, encode

    arr = weight.detach().cpu().numpy() if isinstance(weight, torch.Tensor) else np.asarray(weight)
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    if arr.shape[-1] % lattice.block:
        return False
    # ggml dequantizes level 0 on a negative scale to -0.0; a zero's sign changes no product
    back = decode(encode(arr, lattice.qtype, exact=True), lattice.qtype, arr.shape) + np.float32(0.0)
    return bool(np.array_equal(back.view(np.uint32), (arr + np.float32(0.0)).view(np.uint32)))


def block_scales(block: torch.Tensor, lattice: Lattice, shrink: torch.Tensor | float = 1.0) -> torch.Tensor:
    """fp16-rounded signed scales (as float32) of ``block`` (rows, block) by ggml's rule, optionally
    shrunk (``shrink < 1`` clips the largest weight to the anchor level of a finer grid)."""
    idx = block.abs().argmax(dim=1, keepdim=True)
    m = block.gather(1, idx).squeeze(1)
    return (m * shrink / lattice.anchor).to(torch.float16).to(torch.float32)


def levels(values: torch.Tensor, scale: torch.Tensor, lattice: Lattice) -> torch.Tensor:
    """Nearest levels of ``values`` (..., rows, n) on per-row ``scale`` (..., rows), clamped; 0 where scale is 0."""
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    k = torch.round(values / safe.unsqueeze(-1)).clamp_(lattice.lo, lattice.hi)
    return torch.where(scale.unsqueeze(-1) == 0, torch.zeros_like(k), k)


def search_scales(block: torch.Tensor, weights: torch.Tensor, lattice: Lattice,
                  steps: tuple[float, ...] = tuple(0.1 * i for i in range(-9, 10))) -> torch.Tensor:
    """Per-row fp16 scales (rows,) of ``block`` (rows, block) minimising the ``weights``-weighted
    (block,) rounding error, searched as llama.cpp's importance-matrix quantizer does: for each
    trial inverse scale ``-(|lo| + step) / m`` the levels are rounded, the scale refitted by weighted
    least squares, rounded to fp16, and its error with the levels re-rounded on it compared; ggml's
    own scale is a candidate too.  The scale is free (no level is pinned), so blocks are written by
    `export` at this scale (``converters.gguf_lattice``), not re-derived by ggml's rule."""
    x = block.to(torch.float32)
    w = weights.to(torch.float32).clamp_min(0)
    m = x.gather(1, x.abs().argmax(dim=1, keepdim=True)).squeeze(1)
    safe_m = torch.where(m == 0, torch.ones_like(m), m)
    trial = -(abs(lattice.lo) + torch.tensor(steps, dtype=torch.float32, device=x.device))  # (S,)
    k = torch.round(x.unsqueeze(0) * (trial.unsqueeze(1) / safe_m.unsqueeze(0)).unsqueeze(2))
    k = k.clamp_(lattice.lo, lattice.hi)  # (S, rows, block)
    sum_l2 = (k * k * w).sum(dim=2)
    fit = (k * x.unsqueeze(0) * w).sum(dim=2) / torch.where(sum_l2 > 0, sum_l2, torch.ones_like(sum_l2))
    ggml = block_scales(x, lattice).unsqueeze(0)
    scales = torch.cat([ggml, fit.to(torch.float16).to(torch.float32)])  # (S + 1, rows)
    scales = torch.where(torch.isfinite(scales), scales, ggml.expand_as(scales))
    q = levels(x.expand(len(scales), -1, -1), scales, lattice) * scales.unsqueeze(2)
    err = ((x.unsqueeze(0) - q) ** 2 * w).sum(dim=2)
    best = scales.gather(0, err.argmin(dim=0, keepdim=True)).squeeze(0)
    return torch.where(m == 0, torch.zeros_like(best), best)
