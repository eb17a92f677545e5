"""GPTQ onto a ggml block lattice, with pruned weights as targets of value 0.

For one Linear with weights ``W`` (rows, cols, exact zeros where pruned) and ``H = (1/B) X^T X``,
the columns are swept left to right; each column is rounded to its block's lattice and the
rounding error is fed into the columns not yet rounded through the Cholesky factor of the damped
``H^-1`` (Frantar et al., GPTQ), in lazy batches of ``blocksize`` columns.  Pruned weights are
level 0, so the error their neighbours' updates would have put on them is fed forward too (the
joint sparse-and-quantized sweep of SparseGPT).

Each block's scale is fixed when the sweep reaches its first column, from the block's current
(already updated) weights.  By default (``scales="search"``) it is a free fp16 scale searched as
llama.cpp's importance-matrix quantizer searches one, with ``diag(H)`` as the importance; `export`
writes such blocks exactly (``converters.gguf_lattice``).  With ``scales="anchor"`` it is ggml's
rule, optionally shrunk by the candidate in ``shrinks`` with the lowest ``diag(H)``-weighted rounding
error, and the block's largest-|w| weight takes the anchor level, so that ggml's own quantizer
reproduces every block bit for bit (``quant.lattice``).  If the sweep's calibration error is not
below ggml's round-to-nearest, round-to-nearest is kept: quantization never does worse than `export`
alone on calibration data.  The sweep itself runs on ``H`` shrunk toward its diagonal
(``diag_shrink``), a guard against fitting the calibration tokens' channel correlations; the errors
it reports use the true ``H``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsnot_deploy.algorithms.pruner import shrink_toward_diagonal
from dsnot_deploy.algorithms.reconstruct import damped_hessian, output_error
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.quant.lattice import (
    Lattice,
    block_scales,
    ggml_round_trip,
    levels,
    search_scales,
)
from dsnot_deploy.quant.targets import base_lattice, lattice_for, parse_target

SCALE_MODES = ("anchor", "search")
SEARCHED_TYPES = ("Q4_0", "Q5_0")


@dataclass(frozen=True)
class QuantizeConfig:
    """In-refinement quantization: the ggml ``type``, GPTQ's damping (as SparseGPT's percdamp),
    its lazy-batch width, and the scale shrink candidates searched per block (1.0 = ggml's rule)."""

    type: str = "Q4_0"  # a lattice type, or a preset (SPARSE_Q4, SPARSE_Q5) with per-tensor lattices (quant.targets)
    # chosen on held-out text (SmolLM2 dense, llama.cpp perplexity on WikiText-2 validation 16 x 512,
    # docs/quantize.md): with 8k calibration tokens the plain sweep (no shrink toward diag(H)) fits the
    # calibration set and loses to round-to-nearest; searched scales with the sweep on 0.3 H + 0.7 diag(H)
    # were best over Q4_0 and Q5_0 (20.60 / 18.37 against llama.cpp's imatrix quantizer's 21.33 / 18.55)
    damping: float = 0.1
    blocksize: int = 128
    shrinks: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8)  # "anchor" scales only
    # the sweep runs on (1 - diag_shrink) H + diag_shrink diag(H): 1 = no error feedback (a diag(H)-
    # weighted scale search per block, like llama.cpp's importance matrix), 0 = plain GPTQ
    diag_shrink: float = 0.7
    # "search": a free fp16 scale per block searched like llama.cpp's importance-matrix quantizer with
    # diag(H) as the importance (Q4_0 / Q5_0; Q8_0 keeps "anchor"), written exactly by `export` for a
    # quantized checkpoint (converters.gguf_lattice, and llama.cpp copies such tensors in the presets);
    # "anchor": ggml's scale rule (optionally shrunk) with the block's largest weight pinned, so ggml's
    # own quantizer reproduces every block
    scales: str = "search"
    # also the output head (the tied token embedding) for a single-type target (quant.head); on the same
    # validation text it took Q4_0 from 20.60 to 19.63 and Q5_0 from 18.37 to 18.06 (llama.cpp's imatrix
    # quantizer with the head's statistics too: 20.40 / 18.30)
    head: bool = True

    def __post_init__(self) -> None:
        parse_target(self.type)
        if self.scales not in SCALE_MODES:
            raise UserInputError(f"expected block scales among {', '.join(SCALE_MODES)}; found {self.scales!r}")
        if not self.damping >= 0 or self.blocksize < 32 or self.blocksize % 32:
            raise UserInputError(f"expected damping >= 0 and a blocksize that is a multiple of 32; found {self}")
        if not self.shrinks or not all(0.5 <= s <= 1.0 for s in self.shrinks):
            raise UserInputError(f"expected scale shrinks in [0.5, 1]; found {self.shrinks}")
        if not 0.0 <= self.diag_shrink <= 1.0:
            raise UserInputError(f"expected the sweep's shrink toward diag(H) in [0, 1]; found {self.diag_shrink}")

    @property
    def lattice(self) -> Lattice:
        """The lattice of a single-type target, the base tensors' lattice of a preset."""
        return base_lattice(self.type)

    def lattice_for(self, linear: str, cols: int) -> Lattice | None:
        """One Linear's lattice (``quant.targets.lattice_for``); None: left for llama.cpp at export."""
        return lattice_for(self.type, linear, cols)

    def searches_scales(self, lattice: Lattice) -> bool:
        return self.scales == "search" and lattice.name in SEARCHED_TYPES


@dataclass(frozen=True)
class QuantizeResult:
    """The quantized weights (float32, on the lattice) and the calibration output errors of the
    sweep and of ggml's round-to-nearest, both against the weights before quantization."""

    weight: torch.Tensor
    error_rtn: float
    error_sweep: float
    used_sweep: bool


def _choose_scales(block: torch.Tensor, hdiag: torch.Tensor, lattice: Lattice,
                   shrinks: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale (rows,) and anchor column (rows,) of one block (rows, block) of current weights."""
    anchor_col = block.abs().argmax(dim=1)
    best_scale: torch.Tensor | None = None
    best_err: torch.Tensor | None = None
    for s in shrinks:
        scale = block_scales(block, lattice, s)
        k = levels(block, scale, lattice)
        k.scatter_(1, anchor_col.unsqueeze(1), float(lattice.anchor))
        err = ((block - k * scale.unsqueeze(1)) ** 2 * hdiag).sum(dim=1)
        if best_scale is None:
            best_scale, best_err = scale, err
        else:
            better = err < best_err
            best_scale = torch.where(better, scale, best_scale)
            best_err = torch.where(better, err, best_err)
    assert best_scale is not None
    return best_scale, anchor_col


def gptq_sweep(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizeConfig,
               lattice: Lattice | None = None) -> torch.Tensor:
    """The sweep alone: float32 weights on ``lattice`` (default ``config.lattice``; zeros of ``weight``
    stay +0.0)."""
    lattice = lattice or config.lattice
    rows, cols = weight.shape
    lattice.check_width(cols)
    if hessian.shape != (cols, cols):
        raise UserInputError(f"expected a ({cols}, {cols}) H for weights {tuple(weight.shape)}; found "
                             f"{tuple(hessian.shape)}")
    w = weight.detach().to(torch.float32).clone()
    keep = w != 0
    hd = damped_hessian(hessian.to(torch.float32), config.damping)
    hdiag = hd.diagonal().clone()
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(hd))
    u = torch.linalg.cholesky(hinv, upper=True)
    q = torch.zeros_like(w)
    blk = lattice.block
    search = config.searches_scales(lattice)
    for i1 in range(0, cols, config.blocksize):
        i2 = min(i1 + config.blocksize, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        u1 = u[i1:i2, i1:i2]
        scale = anchor_col = None
        for i in range(i2 - i1):
            c = i1 + i
            if c % blk == 0:
                current = w1[:, i:i + blk] * keep[:, c:c + blk]
                if search:
                    scale, anchor_col = search_scales(current, hdiag[c:c + blk], lattice), None
                else:
                    scale, anchor_col = _choose_scales(current, hdiag[c:c + blk], lattice, config.shrinks)
            assert scale is not None
            col = w1[:, i]
            k = levels(col.unsqueeze(1), scale, lattice).squeeze(1)
            if anchor_col is not None:
                k = torch.where(anchor_col == c % blk, torch.full_like(k, float(lattice.anchor)), k)
            k = torch.where(keep[:, c], k, torch.zeros_like(k))
            qc = k * scale
            q[:, c] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]
    return q + 0.0


def quantize_weight(weight: torch.Tensor, hessian: torch.Tensor, config: QuantizeConfig,
                    lattice: Lattice | None = None) -> QuantizeResult:
    """The sweep, kept only when its calibration output error is below ggml's round-to-nearest's."""
    lattice = lattice or config.lattice
    start = weight.detach().to(torch.float32)
    rtn = torch.from_numpy(ggml_round_trip(start, lattice)).to(start.device) + 0.0
    swept = gptq_sweep(start, shrink_toward_diagonal(hessian, config.diag_shrink), config, lattice)
    h = hessian.to(torch.float32)
    err_rtn, err_sweep = output_error(start, rtn, h), output_error(start, swept, h)
    used = err_sweep < err_rtn
    return QuantizeResult(swept if used else rtn, err_rtn, err_sweep, used)
