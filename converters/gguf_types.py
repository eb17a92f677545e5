"""Output types of `export`: what each one is, who writes it, and whether pruned zeros survive it.

A *type* names either one ggml tensor type for every 2-D weight (F32, F16, BF16, Q8_0, Q4_0, Q5_0 are
written directly with gguf-py's quantizers; the K-quants through llama.cpp's own quantizer), one of
llama.cpp's mixes (Q4_K_M, Q5_K_M, ...: llama.cpp picks a type per tensor), or one of our
*sparsity-safe* presets: a llama.cpp mix restricted to types that keep exact zeros.

Zero preservation (measured with ggml's C quantizer, see ../shared/docs/gguf-and-llamacpp.md):
F32/F16/BF16/Q8_0/Q4_0/Q5_0/Q3_K/Q6_K keep every pruned zero exactly; Q4_1/Q5_1/Q2_K/Q4_K/Q5_K and the
IQ4/IQ3/IQ2 types do not (a block offset or a grid without zero).  The export report always measures
it on the written file, whatever the table says.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType as F

ZERO_KEEPING = frozenset({Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q3_K, Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.MXFP4})


@dataclass(frozen=True)
class OutputType:
    """One row of the type table.

    ``direct`` is the ggml type gguf-py writes for 2-D weights (None: llama.cpp's quantizer decides);
    ``ftype`` is the llama.cpp file type (``general.file_type``); ``overrides`` maps a regular
    expression on GGUF tensor names to the type llama.cpp must use for matching tensors.
    ``keeps_zeros`` is what the type table promises (the written file is checked anyway).
    """

    name: str
    ftype: F
    direct: Q | None = None
    overrides: tuple[tuple[str, Q], ...] = ()
    keeps_zeros: bool = True
    pure: bool = False
    description: str = ""

    @property
    def via_llamacpp(self) -> bool:
        return self.direct is None


def _direct(name: str, qtype: Q, ftype: F, description: str) -> OutputType:
    return OutputType(name=name, ftype=ftype, direct=qtype, keeps_zeros=qtype in ZERO_KEEPING, description=description)


def _mix(name: str, ftype: F, keeps: bool, description: str, pure: bool = False,
         overrides: tuple[tuple[str, Q], ...] = ()) -> OutputType:
    return OutputType(name=name, ftype=ftype, overrides=overrides, keeps_zeros=keeps, pure=pure,
                      description=description)


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
    _mix("Q6_K", F.MOSTLY_Q6_K, True, "6.56 bits/weight K-quant (llama.cpp), keeps zeros"),
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
    _mix("SPARSE_Q4", F.MOSTLY_Q4_0, True, "sparsity-safe ~4.9 bits: Q4_0, Q6_K for attn_v/ffn_down, Q8_0 "
         "embeddings/output", pure=True, overrides=_SENSITIVE),
    _mix("SPARSE_Q5", F.MOSTLY_Q5_0, True, "sparsity-safe ~5.8 bits: Q5_0, Q6_K for attn_v/ffn_down, Q8_0 "
         "embeddings/output", pure=True, overrides=_SENSITIVE),
    _mix("SPARSE_Q3", F.MOSTLY_Q3_K_M, True, "sparsity-safe ~4 bits: Q3_K, Q6_K for attn_v/ffn_down, Q8_0 "
         "embeddings/output", pure=True, overrides=_SENSITIVE),
)}

def zero_keeping_names() -> list[str]:
    """The output types that keep pruned zeros exactly, in table order (for messages and help)."""
    return [name for name, t in OUTPUT_TYPES.items() if t.keeps_zeros]


def parse_output_type(name: str) -> OutputType:
    """Look up a type by name (case-insensitive); the error lists every choice."""
    key = name.strip().upper().replace("-", "_")
    if key not in OUTPUT_TYPES:
        raise KeyError(f"unknown output type {name!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    return OUTPUT_TYPES[key]
