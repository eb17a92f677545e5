"""Output types of `export`: what each one is, who writes it, and whether pruned zeros survive it.

A *type* names either one ggml tensor type for every 2-D weight (F32, F16, BF16, Q8_0, Q4_0, Q5_0 are
written directly with gguf-py's quantizers; the K-quants through llama.cpp's own quantizer), one of
llama.cpp's mixes (Q4_K_M, Q5_K_M, ...: llama.cpp picks a type per tensor), or one of our
*sparsity-safe* presets: a llama.cpp mix restricted to types that keep exact zeros.

Zero preservation (measured with ggml's C quantizer, see ../shared/docs/gguf-and-llamacpp.md):
F32/F16/BF16/Q8_0/Q4_0/Q5_0/Q3_K/Q6_K keep every pruned zero exactly; Q4_1/Q5_1/Q2_K/Q4_K/Q5_K and the
IQ4/IQ3/IQ2 types do not (a block offset or a grid without zero).  The export report always measures
it on the written file, whatever the table says.

Types with a ``base`` (the sparsity-safe presets and Q6_K) are *planned*: the exporter decides the type of
every tensor itself (``plan_tensor_type``) and passes it to llama.cpp by exact name, so llama.cpp never
picks a type of its own.  A K-quant needs rows (ne0, the input width) that are a multiple of 256; where a
row is not, the plan falls back to the smallest zero-keeping type with at least as many bits whose block
divides the row (Q3_K -> Q4_0, Q6_K -> Q8_0, else F16), and the export report lists every such tensor.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

logger = logging.getLogger(__name__)

# types `export --embedding-type` writes for the token embedding / output head (gguf-py encodes them)
EMBEDDING_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q5_0", "Q4_0")
ZERO_KEEPING = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q3_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.MXFP4})


@dataclass(frozen=True)
class OutputType:
    """One row of the type table.

    ``direct`` is the ggml type gguf-py writes for 2-D weights (None: llama.cpp's quantizer decides);
    ``ftype`` is the llama.cpp file type (``general.file_type``); ``overrides`` maps a regular
    expression on GGUF tensor names to the type llama.cpp must use for matching tensors.
    ``keeps_zeros`` is what the type table promises (the written file is checked anyway).
    ``base``: for types whose every tensor type we plan ourselves (see ``plan_tensor_type``), the type of
    2-D weights no override names; None for llama.cpp's own mixes (llama.cpp decides per tensor).
    """

    name: str
    ftype: F
    direct: Q | None = None
    overrides: tuple[tuple[str, Q], ...] = ()
    keeps_zeros: bool = True
    pure: bool = False
    description: str = ""
    base: Q | None = None

    @property
    def via_llamacpp(self) -> bool:
        return self.direct is None

    @property
    def planned(self) -> bool:
        """Written by llama.cpp with every tensor's type chosen by us (``plan_tensor_type``)."""
        return self.direct is None and self.base is not None


def _direct(name: str, qtype: Q, ftype: F, description: str) -> OutputType:
    return OutputType(name=name, ftype=ftype, direct=qtype, keeps_zeros=qtype in ZERO_KEEPING, description=description)


def _mix(name: str, ftype: F, keeps: bool, description: str, pure: bool = False,
         overrides: tuple[tuple[str, Q], ...] = (), base: Q | None = None) -> OutputType:
    return OutputType(name=name, ftype=ftype, overrides=overrides, keeps_zeros=keeps, pure=pure,
                      description=description, base=base)


# The tensors llama.cpp's own mixes treat as sensitive: attention values, FFN down projections and
# the output head.  The sparsity-safe presets give them 6-8 bits with zero-keeping types.
_SENSITIVE: tuple[tuple[str, Q], ...] = (
    (r"attn_v\.weight", Q.Q6_K),
    (r"ffn_down\.weight", Q.Q6_K),
    (r"^output\.weight", Q.Q8_0),
    (r"^token_embd\.weight", Q.Q8_0),
)

OUTPUT_TYPES: dict[str, OutputType] = {t.name: t for t in (
    _direct("F32", Q.F32, F.ALL_F32, "32-bit float, exact"),
    _direct("F16", Q.F16, F.MOSTLY_F16, "16-bit float"),
    _direct("BF16", Q.BF16, F.MOSTLY_BF16, "bfloat16"),
    _direct("Q8_0", Q.Q8_0, F.MOSTLY_Q8_0, "8.5 bits/weight, one f16 scale per 32"),
    _direct("Q4_0", Q.Q4_0, F.MOSTLY_Q4_0, "4.5 bits/weight, symmetric, keeps zeros"),
    _direct("Q5_0", Q.Q5_0, F.MOSTLY_Q5_0, "5.5 bits/weight, symmetric, keeps zeros"),
    _direct("Q4_1", Q.Q4_1, F.MOSTLY_Q4_1, "5 bits/weight with a block offset: loses zeros"),
    _direct("Q5_1", Q.Q5_1, F.MOSTLY_Q5_1, "6 bits/weight with a block offset: loses zeros"),
    _mix("Q6_K", F.MOSTLY_Q6_K, True, "6.56 bits/weight K-quant (llama.cpp), keeps zeros; rows not a multiple "
         "of 256 are written as Q8_0 (listed in the report)", pure=True, base=Q.Q6_K),
    _mix("Q3_K_S", F.MOSTLY_Q3_K_S, False, "llama.cpp mix: Q3_K with some Q4_K/Q5_K"),
    _mix("Q3_K_M", F.MOSTLY_Q3_K_M, False, "llama.cpp mix: Q3_K with Q4_K/Q5_K for sensitive tensors"),
    _mix("Q3_K_L", F.MOSTLY_Q3_K_L, False, "llama.cpp mix: Q3_K with Q5_K for sensitive tensors"),
    _mix("Q2_K", F.MOSTLY_Q2_K, False, "llama.cpp mix around Q2_K: loses zeros"),
    _mix("Q4_K_S", F.MOSTLY_Q4_K_S, False, "llama.cpp mix, mostly Q4_K: loses zeros"),
    _mix("Q4_K_M", F.MOSTLY_Q4_K_M, False, "llama.cpp mix, mostly Q4_K with Q6_K: loses zeros"),
    _mix("Q5_K_S", F.MOSTLY_Q5_K_S, False, "llama.cpp mix, mostly Q5_K: loses zeros"),
    _mix("Q5_K_M", F.MOSTLY_Q5_K_M, False, "llama.cpp mix, mostly Q5_K with Q6_K: loses zeros"),
    _mix("IQ4_NL", F.MOSTLY_IQ4_NL, False, "llama.cpp non-linear 4-bit: loses zeros"),
    _mix("IQ4_XS", F.MOSTLY_IQ4_XS, False, "llama.cpp non-linear 4.25-bit: loses zeros"),
    # Sparsity-safe presets: every tensor type keeps exact zeros.
    _mix("SPARSE_Q4", F.MOSTLY_Q4_0, True, "sparsity-safe ~4.9 bits: Q4_0, Q6_K for attn_v/ffn_down (Q8_0 where "
         "rows are not a multiple of 256), Q8_0 embeddings/output", pure=True, overrides=_SENSITIVE, base=Q.Q4_0),
    _mix("SPARSE_Q5", F.MOSTLY_Q5_0, True, "sparsity-safe ~5.8 bits: Q5_0, Q6_K for attn_v/ffn_down (Q8_0 where "
         "rows are not a multiple of 256), Q8_0 embeddings/output", pure=True, overrides=_SENSITIVE, base=Q.Q5_0),
    _mix("SPARSE_Q3", F.MOSTLY_Q3_K_M, True, "sparsity-safe ~4 bits: Q3_K, Q6_K for attn_v/ffn_down, Q8_0 "
         "embeddings/output; Q3_K/Q6_K need rows that are a multiple of 256, so a model whose widths are not "
         "(e.g. SmolLM2-135M, 576) gets Q4_0 (Q5_0 never; Q8_0 for Q6_K) fallback tensors instead, listed in "
         "the report - on such a model SPARSE_Q3 writes what SPARSE_Q4 writes", pure=True, overrides=_SENSITIVE,
         base=Q.Q3_K),
)}

# Zero-keeping types a planned tensor may fall back to when its rows do not fit the intended type's block,
# tried from the fewest bits per weight up.  Q3_K (3.44 bits) falls back to Q4_0 (4.5), not Q5_0 (5.5):
# the rule takes the smallest type with at least the intended bits, so a fallback never spends fewer bits
# than the plan, and Q4_0 already spends 1 bit/weight more (Q5_0 would add a second bit to the tensors the
# preset meant to be its cheapest; a user who wants them is served by SPARSE_Q5).  Q6_K (6.56) -> Q8_0.
_FALLBACK_CANDIDATES: tuple[Q, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.F16)


@dataclass(frozen=True)
class TensorTypeChoice:
    """The type one tensor is meant to have (``intended``) and the type planned for the file (``written``).

    ``reason`` says why they differ (empty when they do not); ``decided_by`` names who chose ``written``:
    ``"dsnot-deploy"`` (our plan) or ``"llama.cpp"`` (its mix or its own fallback).
    """

    name: str
    intended: str
    written: str
    reason: str = ""
    decided_by: str = "dsnot-deploy"

    @property
    def fallback(self) -> bool:
        return self.written != self.intended

    def as_dict(self) -> dict[str, str]:
        return {"name": self.name, "intended": self.intended, "written": self.written, "reason": self.reason,
                "decided_by": self.decided_by}


def bits_per_weight(qtype: Q) -> float:
    block, type_size = GGML_QUANT_SIZES[qtype]
    return 8.0 * type_size / block


def block_size(qtype: Q) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def intended_type(otype: OutputType, tensor_name: str) -> Q:
    """The type a planned output type means for a 2-D weight: the first matching override, else its base."""
    if otype.base is None:
        raise ValueError(f"{otype.name} is a llama.cpp mix: llama.cpp chooses its tensor types")
    for pattern, qtype in otype.overrides:
        if re.search(pattern, tensor_name):
            return qtype
    return otype.base


def zero_keeping_fallback(intended: Q, ncols: int) -> Q:
    """The type for rows of ``ncols`` when ``intended``'s block does not divide them: the zero-keeping type
    with the fewest bits per weight, at least ``intended``'s, whose block divides ``ncols`` (F16 at worst)."""
    floor = bits_per_weight(intended)
    for qtype in _FALLBACK_CANDIDATES:
        if ncols % block_size(qtype) == 0 and bits_per_weight(qtype) >= floor:
            return qtype
    return Q.F16


def plan_tensor_type(otype: OutputType, tensor_name: str, ncols: int) -> TensorTypeChoice:
    """The type of one 2-D weight with rows of ``ncols`` (ne0) in a planned output type, with its fallback."""
    intended = intended_type(otype, tensor_name)
    if ncols % block_size(intended) == 0:
        return TensorTypeChoice(tensor_name, intended.name, intended.name)
    written = zero_keeping_fallback(intended, ncols)
    return TensorTypeChoice(tensor_name, intended.name, written.name, fallback_reason(intended.name, ncols))


def fallback_reason(intended: str, ncols: int) -> str:
    block = block_size(Q[intended]) if intended in Q.__members__ else 0
    return f"rows {ncols} not a multiple of {block} ({intended} block size)" if block else \
        f"rows {ncols} do not fit {intended}"


def summarize_fallbacks(choices: Iterable[TensorTypeChoice | None]) -> list[str]:
    """One line per (intended, written, reason) group, e.g. "150 tensors Q3_K -> Q4_0: rows 576 not a
    multiple of 256 (Q3_K block size)", largest group first (None entries, tensors without a plan, skipped)."""
    groups: dict[tuple[str, str, str], int] = {}
    for c in choices:
        if c is not None and c.fallback:
            key = (c.intended, c.written, c.reason)
            groups[key] = groups.get(key, 0) + 1
    ordered = sorted(groups.items(), key=lambda kv: (-kv[1], kv[0]))
    return [f"{n} tensor{'s' if n != 1 else ''} {i} -> {w}: {r}" for (i, w, r), n in ordered]


def plan_weight(otype: OutputType | None, weight_type: Q, name: str, ncols: int) -> tuple[Q, TensorTypeChoice | None]:
    """(the type gguf-py streams, the type planned for the finished file) of a 2-D weight with rows of ``ncols``.

    A direct type (or ``otype`` None) streams ``weight_type``, or F16 where its block does not divide the
    rows.  A llama.cpp type streams the float carrier ``weight_type``; the file's type is
    ``plan_tensor_type``'s for planned types, None (llama.cpp's mix decides) for the others."""
    if otype is not None and otype.via_llamacpp:
        return weight_type, plan_tensor_type(otype, name, ncols) if otype.planned else None
    if ncols % block_size(weight_type) == 0:
        return weight_type, TensorTypeChoice(name, weight_type.name, weight_type.name)
    return Q.F16, TensorTypeChoice(name, weight_type.name, Q.F16.name, fallback_reason(weight_type.name, ncols))


def exact_overrides(choices: Mapping[str, TensorTypeChoice | None]) -> tuple[tuple[str, Q], ...]:
    """The planned types as llama.cpp overrides, one anchored exact name each (F32 tensors, the 1-D ones
    llama.cpp never quantizes, are not named)."""
    return tuple((f"^{re.escape(name)}$", Q[c.written]) for name, c in choices.items()
                 if c is not None and c.written != "F32")


def check_written_types(
    planned: Mapping[str, TensorTypeChoice | None], written: Mapping[str, str], native: Mapping[str, TensorTypeChoice]
) -> tuple[list[TensorTypeChoice], list[TensorTypeChoice]]:
    """Compare a file's tensor types (``written``, by name) with the plan: (every fallback, the mismatches).

    A planned tensor written as planned is a fallback when its plan is one; one written otherwise is a
    mismatch (and a fallback decided by llama.cpp).  A tensor whose type llama.cpp's mix chose (plan None)
    is a fallback when llama.cpp's log said so (``native``).  Mismatches and llama.cpp's fallbacks are
    logged here; the plan's own fallbacks are logged before writing (``summarize_fallbacks``)."""
    fallbacks: list[TensorTypeChoice] = []
    mismatches: list[TensorTypeChoice] = []
    unplanned: list[TensorTypeChoice] = []
    for name, choice in planned.items():
        actual, said = written.get(name, "absent"), native.get(name)
        if choice is None:
            if said is not None:
                unplanned.append(TensorTypeChoice(name, said.intended, actual, said.reason, "llama.cpp"))
        elif actual == choice.written:
            if choice.fallback:
                fallbacks.append(choice)
        else:
            why = f"planned {choice.written}, llama.cpp wrote {actual}" + (f" ({said.reason})" if said else "")
            mismatches.append(TensorTypeChoice(name, choice.intended, actual, why, "llama.cpp"))
    for line in summarize_fallbacks(unplanned):
        logger.warning("llama.cpp fell back: %s", line)
    if mismatches:
        shown = ", ".join(f"{m.name} ({m.reason})" for m in mismatches[:5])
        logger.warning("%d tensor%s written in another type than planned: %s%s", len(mismatches),
                       "s" if len(mismatches) != 1 else "", shown, ", ..." if len(mismatches) > 5 else "")
    return fallbacks + unplanned + mismatches, mismatches


def type_report(
    planned: Mapping[str, TensorTypeChoice | None], written: Mapping[str, str], native: Mapping[str, TensorTypeChoice]
) -> dict[str, Any]:
    """The export report's fallback entries: ``fallback_tensors`` (names), ``fallbacks`` (name, intended,
    written, reason, decided_by) and ``type_check`` (tensors planned, tensors llama.cpp's mix chose, and
    every tensor written in another type than planned)."""
    fallbacks, mismatches = check_written_types(planned, written, native)
    n_planned = sum(c is not None for c in planned.values())
    return {
        "fallback_tensors": [f.name for f in fallbacks],
        "fallbacks": [f.as_dict() for f in fallbacks],
        "type_check": {"planned": n_planned, "chosen_by_llamacpp": len(planned) - n_planned,
                       "mismatches": [m.as_dict() for m in mismatches]},
    }


def zero_keeping_names() -> list[str]:
    """The output types that keep pruned zeros exactly, in table order (for messages and help)."""
    return [name for name, t in OUTPUT_TYPES.items() if t.keeps_zeros]


def parse_output_type(name: str) -> OutputType:
    """Look up a type by name (case-insensitive); the error lists every choice."""
    key = name.strip().upper().replace("-", "_")
    if key not in OUTPUT_TYPES:
        raise KeyError(f"unknown output type {name!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    return OUTPUT_TYPES[key]
