"""The configurations of a size/quality frontier: dense types, and sparsities x zero-keeping types,
with and without in-refinement quantization. Pure: names in, checked frozen configs out."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dsnot_deploy.errors import UserInputError

REFERENCE_TYPE = "F16"  # every perplexity is divided by the dense model's in this type
DEFAULT_DENSE_TYPES = ("F16", "Q8_0", "Q6_K", "Q5_0", "Q4_K_M", "Q4_0", "Q3_K_M")
DEFAULT_SPARSITIES = ("0.3", "0.5", "2:4")
DEFAULT_SPARSE_TYPES = ("F16", "Q8_0", "Q5_0", "Q4_0", "SPARSE_Q4")


@dataclass(frozen=True)
class FrontierPoint:
    """One file of the frontier. ``sparsity``: None (dense), ``"0.5"`` or ``"2:4"``; ``qtype``: the
    GGUF type; ``quantized``: refined with ``RefineJob.quantize`` onto ``qtype``'s lattice."""

    sparsity: str | None
    qtype: str
    quantized: bool = False

    @property
    def dense(self) -> bool:
        return self.sparsity is None

    @property
    def key(self) -> str:
        """A stable file-name-safe id (rows are matched on it when a run resumes)."""
        state = "dense" if self.sparsity is None else "sparse-" + self.sparsity.replace(":", "of")
        return f"{state}-{self.qtype}" + ("-rq" if self.quantized else "")

    @property
    def state(self) -> str:
        """The checkpoint this point is exported from (one refine per state)."""
        if self.sparsity is None:
            return "dense"
        return "sparse-" + self.sparsity.replace(":", "of") + (f"-rq{self.qtype}" if self.quantized else "")

    @property
    def label(self) -> str:
        """For tables and plots: ``dense Q4_0``, ``30% Q4_0``, ``2:4 Q4_0 +rq``."""
        if self.sparsity is None:
            return f"dense {self.qtype}"
        where = self.sparsity if ":" in self.sparsity else f"{float(self.sparsity):.0%}"
        return f"{where} {self.qtype}" + (" +rq" if self.quantized else "")


def normalize_sparsity(text: str) -> str:
    """``"0.50"`` -> ``"0.5"``, ``"2:4"`` stays; a bad value is a UserInputError."""
    from dsnot_deploy.algorithms.config import SparsityPattern

    pattern = SparsityPattern.parse(str(text).strip())
    if pattern.is_nm:
        return f"{pattern.n}:{pattern.m}"
    if not 0.0 < pattern.sparsity < 1.0:
        raise UserInputError(f"expected a sparsity in (0, 1) or an N:M pattern like 2:4; found {text!r}")
    return f"{pattern.sparsity:g}"


def normalize_type(name: str, *, sparse: bool) -> str:
    """The table's spelling of a GGUF type; sparse files need a type that keeps pruned zeros."""
    from converters.gguf_types import parse_output_type, zero_keeping_names

    try:
        otype = parse_output_type(name)
    except KeyError as exc:
        raise UserInputError(str(exc.args[0])) from None
    if sparse and not otype.keeps_zeros:
        raise UserInputError(f"expected sparse types that keep pruned zeros, found {otype.name} "
                             f"({otype.description}); choose among {', '.join(zero_keeping_names())}")
    return otype.name


def quantizable_types() -> tuple[str, ...]:
    """Types in-refinement quantization can aim at (``dsnot_deploy.quant.targets``: the lattice types
    and the sparsity-safe presets with per-tensor lattices)."""
    from dsnot_deploy.quant.targets import TARGETS

    return tuple(TARGETS)


def _unique(values: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(values))


def plan_points(dense_types: Sequence[str] = DEFAULT_DENSE_TYPES, sparsities: Sequence[str] = DEFAULT_SPARSITIES,
                sparse_types: Sequence[str] = DEFAULT_SPARSE_TYPES,
                quantize_types: Sequence[str] | None = None) -> tuple[FrontierPoint, ...]:
    """Every point, in the order they are measured: dense F16 (the reference, always) and the other
    dense types, then per sparsity its types, then its in-refinement-quantized types.

    ``quantize_types``: the sparse types also refined with ``--quantize`` (None: every sparse type
    that has a lattice; empty: the arm is off); each must be among the sparse types and have a lattice.
    """
    dense = _unique([REFERENCE_TYPE, *(normalize_type(t, sparse=False) for t in dense_types)])
    spars = _unique([normalize_sparsity(s) for s in sparsities])
    stypes = _unique([normalize_type(t, sparse=True) for t in sparse_types])
    if spars and not stypes:
        raise UserInputError("expected at least one sparse type with sparsities given; found none")
    lattices = quantizable_types()
    if quantize_types is None:
        qtypes = [t for t in stypes if t in lattices]
    else:
        qtypes = _unique([normalize_type(t, sparse=True) for t in quantize_types])
        for t in qtypes:
            if t not in lattices:
                raise UserInputError(f"expected in-refinement quantization types among {', '.join(lattices)}; "
                                     f"found {t}")
            if t not in stypes:
                raise UserInputError(f"expected each quantized type among the sparse types "
                                     f"({', '.join(stypes)}); found {t}")
    points = [FrontierPoint(None, t) for t in dense]
    for s in spars:
        points += [FrontierPoint(s, t) for t in stypes]
        points += [FrontierPoint(s, t, quantized=True) for t in qtypes]
    return tuple(points)
