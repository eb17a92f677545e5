"""The architecture table: how a Hugging Face decoder maps onto a llama.cpp architecture.

A new architecture is a new row of ``ARCHITECTURES``.  Tensor names come from gguf-py's own
``TensorNameMap``; hyperparameter keys from ``GGUFWriter``'s helpers.  Each row says only what
differs: whether Q/K rows need llama's rotary permutation, whether RMSNorm weights are stored as
``w - 1`` (Gemma), and which extra keys the architecture reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np

from dsnot_deploy.errors import UnsupportedModelError


def _rope_params(cfg: dict[str, Any], kind: str | None = None) -> dict[str, Any]:
    """Rotary settings in either transformers layout (v5 ``rope_parameters`` or v4 ``rope_theta``)."""
    params = cfg.get("rope_parameters") or {}
    if kind is not None and isinstance(params.get(kind), dict):
        params = params[kind]
    elif params and all(isinstance(v, dict) for v in params.values()):
        params = params.get("full_attention") or next(iter(params.values()))
    merged = dict(cfg.get("rope_scaling") or {})
    merged.update(params)
    if "rope_theta" not in merged and "rope_theta" in cfg:
        merged["rope_theta"] = cfg["rope_theta"]
    merged.setdefault("rope_type", merged.get("type", "default"))
    return merged


def head_dim(cfg: dict[str, Any]) -> int:
    return int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])


def llama3_rope_factors(cfg: dict[str, Any]) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rope scaling (llama.cpp reads them from ``rope_freqs``).

    Wavelengths shorter than ``original_max / high_freq_factor`` are kept, longer than
    ``original_max / low_freq_factor`` are divided by ``factor``, and in between the divisor
    interpolates smoothly in inverse (1 / ((1 - s) / factor + s)).
    """
    rope = _rope_params(cfg)
    base = float(rope["rope_theta"])
    dim = head_dim(cfg)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    freqs = 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    divisors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            divisors.append(1.0)
        elif wavelen > old_ctx / low:
            divisors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def _write_rope_scaling(w: gguf.GGUFWriter, rope: dict[str, Any]) -> None:
    kind = rope.get("rope_type", "default")
    if kind in ("default", None, "llama3"):  # llama3 travels as the rope_freqs tensor
        return
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))
        return
    raise UnsupportedModelError(f"rope scaling type {kind!r} is not supported (supported: default, linear, llama3)")


def write_common_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """The keys every llama-like architecture reads."""
    n_head = int(cfg["num_attention_heads"])
    w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
    w.add_embedding_length(int(cfg["hidden_size"]))
    w.add_block_count(int(cfg["num_hidden_layers"]))
    w.add_feed_forward_length(int(cfg["intermediate_size"]))
    w.add_head_count(n_head)
    w.add_head_count_kv(int(cfg.get("num_key_value_heads") or n_head))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(int(cfg["vocab_size"]))
    dim = head_dim(cfg)
    w.add_rope_dimension_count(dim)
    if dim != int(cfg["hidden_size"]) // n_head or str(cfg.get("model_type", "")).startswith(("qwen3", "gemma3")):
        w.add_key_length(dim)  # llama.cpp's default is hidden / heads (Qwen3 and Gemma 3 always carry it)
        w.add_value_length(dim)
    rope = _rope_params(cfg)
    # Gemma 3's global layers default to 1e6 (transformers' Gemma3TextConfig); others to 10000
    default = 1e6 if str(cfg.get("model_type", "")).startswith("gemma3") else 10000.0
    w.add_rope_freq_base(float(rope.get("rope_theta", default)))
    _write_rope_scaling(w, rope)


def _no_extra_hparams(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    """Llama and Mistral need only the common keys (biases, when present, travel as tensors)."""


def _gemma3_extra(w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
    dim = head_dim(cfg)
    scalar = cfg.get("query_pre_attn_scalar")
    n_layers = int(cfg["num_hidden_layers"])
    if scalar is not None and int(scalar) != dim:
        # llama.cpp scales queries by 1/sqrt(head_dim) except for its 62-layer (27B) type, whose
        # scale is 1/sqrt(hidden/heads); anything else would give silently wrong logits.
        is_27b_rule = n_layers == 62 and int(scalar) == int(cfg["hidden_size"]) // int(cfg["num_attention_heads"])
        if not is_27b_rule:
            raise UnsupportedModelError(
                f"gemma3 with query_pre_attn_scalar={scalar} but head_dim={dim}: llama.cpp would scale queries "
                f"by 1/sqrt({dim}); refusing to write a file with wrong attention"
            )
    window = cfg.get("sliding_window")
    layer_types = cfg.get("layer_types")
    if window:
        w.add_sliding_window(int(window))
        if layer_types:
            w.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        else:
            w.add_sliding_window_pattern(int(cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6))
        local = _rope_params(cfg, "sliding_attention")
        base = local.get("rope_theta", cfg.get("rope_local_base_freq"))
        if base is not None:
            w.add_rope_freq_base_swa(float(base))
    if cfg.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(float(cfg["final_logit_softcapping"]))
    if cfg.get("attn_logit_softcapping"):
        w.add_attn_logit_softcapping(float(cfg["attn_logit_softcapping"]))


def _permute_rows(weight: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotate-half -> llama.cpp adjacent-pair rotary: permute Q/K rows within each head.

    (rows, ...) -> (n_head, 2, rows / n_head / 2, ...) -> swap axes 1, 2 -> (rows, ...).  Rows move
    whole, so pruned zeros move with their weights.
    """
    rows = weight.shape[0]
    if rows % (2 * n_head):
        raise UnsupportedModelError(f"cannot permute {rows} rows over {n_head} heads (rows must divide 2 x heads)")
    tail = weight.shape[1:]
    return weight.reshape(n_head, 2, rows // n_head // 2, *tail).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class ArchSpec:
    """One row of the table."""

    hf_names: tuple[str, ...]
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool = False
    norm_plus_one: bool = False
    extra_hparams: Callable[[gguf.GGUFWriter, dict[str, Any]], None] = _no_extra_hparams

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    def row_order(self, hf_name: str, rows: int, cfg: dict[str, Any]) -> np.ndarray | None:
        """The source row of every written row when the tensor's rows are permuted (Q/K), else None."""
        if self.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
            return _permute_rows(np.arange(rows), int(cfg["num_attention_heads"]))
        if self.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
            n_kv = int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
            return _permute_rows(np.arange(rows), n_kv)
        return None

    def rewrites_values(self, hf_name: str) -> bool:
        """Whether `rewrite_values` changes this tensor's values (Gemma's norms)."""
        return self.norm_plus_one and hf_name.endswith("norm.weight")

    def rewrite_values(self, hf_name: str, array: np.ndarray) -> np.ndarray:
        """The element-wise rewrite (Gemma's norm offset) of a tensor, or of any rows of it."""
        return array + np.float32(1.0) if self.rewrites_values(hf_name) else array

    def transform(self, hf_name: str, array: np.ndarray, cfg: dict[str, Any]) -> np.ndarray:
        """Apply the row's tensor rewrites (permutation, Gemma's norm offset) to one whole tensor."""
        order = self.row_order(hf_name, array.shape[0], cfg) if array.ndim else None
        return self.rewrite_values(hf_name, array if order is None else array[order])

    def write_hparams(self, w: gguf.GGUFWriter, cfg: dict[str, Any]) -> None:
        write_common_hparams(w, cfg)
        self.extra_hparams(w, cfg)


ARCHITECTURES: tuple[ArchSpec, ...] = (
    ArchSpec(("LlamaForCausalLM",), gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    ArchSpec(("MistralForCausalLM",), gguf.MODEL_ARCH.LLAMA, permute_qk=True),
    ArchSpec(("Qwen2ForCausalLM",), gguf.MODEL_ARCH.QWEN2),
    ArchSpec(("Qwen3ForCausalLM",), gguf.MODEL_ARCH.QWEN3, extra_hparams=_no_extra_hparams),
    ArchSpec(("Gemma3ForCausalLM", "Gemma3TextForCausalLM"), gguf.MODEL_ARCH.GEMMA3, norm_plus_one=True,
             extra_hparams=_gemma3_extra),
)


def find_arch(hf_architecture: str) -> ArchSpec:
    for spec in ARCHITECTURES:
        if hf_architecture in spec.hf_names:
            return spec
    supported = ", ".join(n for spec in ARCHITECTURES for n in spec.hf_names)
    raise UnsupportedModelError(f"architecture {hf_architecture!r} cannot be exported to GGUF; supported: {supported}")


def needs_rope_freqs(cfg: dict[str, Any]) -> bool:
    return _rope_params(cfg).get("rope_type") == "llama3"
