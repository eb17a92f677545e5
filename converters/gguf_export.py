"""Export a Hugging Face checkpoint (dense, or sparse from `refine`) to a GGUF that llama.cpp runs.

Flow: index the checkpoint -> plan every tensor (GGUF name, type, byte size) -> write header,
metadata and tensor infos -> stream the tensors a few rows at a time (read, rewrite, quantize, count
zeros, write, free: ``gguf_stream``) -> for llama.cpp-only types, run llama.cpp's quantizer on that
intermediate file -> check the file read back (tensor table, bytes, or llama.cpp's output against
the checkpoint) -> rename into place and write ``OUT.export.json``.  Nothing appears under the final name until it is
complete; temporaries live next to it and are removed on any failure.

Every tensor's type is planned first (``gguf_types.plan_weight``: F16 or zero-keeping fallbacks where rows
do not fit a block), passed to llama.cpp by exact name, checked on the written file and reported.
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from dsnot_deploy import __version__
from dsnot_deploy.atomic import (
    atomic_write_bytes,
    check_output_file,
    remove_stale_temporaries,
    temporary_path,
)
from dsnot_deploy.errors import UnsupportedModelError, UserInputError
from dsnot_deploy.progress import Progress, open_bar

from . import gguf_types
from .gguf_arch import ArchSpec, find_arch, llama3_rope_factors, needs_rope_freqs
from .gguf_lattice import log_lattice, placed_on_lattice
from .gguf_metadata import (
    NAMING_WRITERS,
    manifest_summary,
    naming_keys,
    write_dsnot_metadata,
)
from .gguf_read import GGUFLayout, read_gguf_layout
from .gguf_stream import (
    TensorSource,
    Written,
    check_layout,
    check_written_bytes,
    encode,
    stream_tensors,
    verify_file,
)
from .gguf_tokenizer import (
    build_vocab,
    detect_pre,
    load_hf_tokenizer,
    tokenization_mismatches,
    usable_probes,
    write_vocab,
)
from .gguf_types import OutputType, parse_output_type, zero_keeping_names
from .gguf_zeros import summarize
from .hf_source import HFCheckpoint, open_checkpoint
from .imatrix import load_export_imatrix
from .llamacpp_quantize import llamacpp_quantize
from .versions import runtime_versions

logger = logging.getLogger(__name__)

REPORT_SUFFIX = ".export.json"
# A checkpoint without a manifest counts as sparse when this fraction of its first layer is zero.
SPARSE_ZERO_FRACTION = 0.1
_SKIPPED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class ExportConfig:
    """What to write.  ``imatrix``: "auto" (the checkpoint's calibration statistics if present),
    "none", or a file (llama.cpp imatrix GGUF or our calibration_stats.safetensors)."""

    qtype: str = "F16"
    imatrix: str = "auto"
    allow_zero_loss: bool = False
    force: bool = False
    progress: Progress = True  # a bar factory (dsnot_deploy.progress), True for terminal bars, False
    tokenizer_pre: str | None = None  # None: detect by asking llama.cpp (see gguf_tokenizer)
    threads: int = 0  # llama.cpp quantizer threads; 0 = all cores
    # general.* naming keys (name, basename, finetune, organization, size_label, license, version) of the
    # model source, used when the checkpoint's refine manifest records none (see _naming)
    naming: tuple[tuple[str, str], ...] | None = None
    # read the written tensors back and count the pruned zeros that survived (cost: report seconds.verify)
    verify: bool = True
    # the type of the token embedding and of an untied output head (None: the file's type), e.g. Q8_0 in a
    # Q4_0 file, as llama-quantize's --token-embedding-type / --output-tensor-type
    embedding_type: str | None = None

    def __post_init__(self) -> None:
        try:
            parse_output_type(self.qtype)
        except KeyError as exc:
            raise UserInputError(str(exc.args[0])) from None
        if self.embedding_type is not None and self.embedding_type not in gguf_types.EMBEDDING_TYPES:
            raise UserInputError(f"expected an embedding type among {', '.join(gguf_types.EMBEDDING_TYPES)}; "
                                 f"found {self.embedding_type!r}")


@dataclass(frozen=True)
class PlannedTensor:
    hf_name: str | None  # None for tensors we compute (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]  # row-major, numpy order
    qtype: Q  # the type streamed by gguf-py (the float carrier when llama.cpp quantizes afterwards)
    pruned: bool  # a 2-D weight inside a decoder layer: its zeros are counted
    choice: gguf_types.TensorTypeChoice | None = None  # the finished file's type; None: llama.cpp's mix decides

    @property
    def nbytes(self) -> int:
        block, type_size = gguf.GGML_QUANT_SIZES[self.qtype]
        n = int(np.prod(self.shape))
        return n // block * type_size


@dataclass
class _Plan:
    tensors: list[PlannedTensor] = field(default_factory=list)

    def by_name(self) -> dict[str, PlannedTensor]:
        return {t.gguf_name: t for t in self.tensors}

    def choices(self) -> dict[str, gguf_types.TensorTypeChoice | None]:
        return {t.gguf_name: t.choice for t in self.tensors}


EMBEDDING_NAMES = ("token_embd.weight", "output.weight")


def report_path(out: Path) -> Path:
    return out.with_name(out.name + REPORT_SUFFIX)


def _name_mapper(spec: ArchSpec, n_blocks: int):
    tmap = gguf.get_tensor_name_map(spec.gguf_arch, n_blocks)

    def gguf_name(hf_name: str) -> str | None:
        return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    return gguf_name


def _is_tied(ckpt: HFCheckpoint) -> bool:
    cfg = ckpt.text_config
    tie = ckpt.config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True))
    return bool(tie) or "lm_head.weight" not in ckpt.tensors


_CARRIER_FTYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
                   Q.BF16: gguf.LlamaFileType.MOSTLY_BF16}


def _intermediate_type(ckpt: HFCheckpoint) -> Q:
    """Lossless carrier for llama.cpp's quantizer: the checkpoint's own float width."""
    dtypes = {ref.dtype for ref in ckpt.tensors.values() if len(ref.shape) == 2}
    if dtypes == {"BF16"}:
        return Q.BF16
    if dtypes == {"F16"}:
        return Q.F16
    return Q.F32


def plan_tensors(ckpt: HFCheckpoint, spec: ArchSpec, weight_type: Q, otype: OutputType | None = None,
                 embedding: Q | None = None) -> _Plan:
    """Every tensor's name, shape and types; ``embedding``: the type of token_embd / output weights.

    For a type llama.cpp writes from our plan (the presets), a Linear already on the lattice of the type
    planned for it is streamed in that type: llama.cpp copies a tensor already in its target type, so
    the values `refine --quantize` chose are written with no second rounding."""
    cfg = ckpt.text_config
    placed = placed_on_lattice(ckpt.manifest, ckpt.tensors) if otype is not None and otype.planned else {}
    n_blocks = int(cfg["num_hidden_layers"])
    to_gguf = _name_mapper(spec, n_blocks)
    tied = _is_tied(ckpt)
    plan = _Plan()
    for hf_name in sorted(ckpt.tensors, key=_natural_key):
        if hf_name.endswith(_SKIPPED_SUFFIXES) or (tied and hf_name == "lm_head.weight"):
            continue
        ref = ckpt.tensors[hf_name]
        name = to_gguf(hf_name)  # gguf-py keeps the .weight/.bias suffix
        if name is None:
            raise UnsupportedModelError(
                f"tensor {hf_name} of {ckpt.architecture} has no GGUF name in gguf-py's table for {spec.name}"
            )
        if len(ref.shape) == 2 and name.endswith(".weight"):
            if embedding is not None and name in EMBEDDING_NAMES:
                if otype is not None and otype.via_llamacpp:
                    qtype, choice = weight_type, gguf_types.TensorTypeChoice(name, embedding.name, embedding.name)
                else:
                    qtype, choice = gguf_types.plan_weight(None, embedding, name, ref.shape[-1])
            else:
                qtype, choice = gguf_types.plan_weight(otype, weight_type, name, ref.shape[-1])  # ne0: row length
                if choice is not None and hf_name in placed and placed[hf_name].name == choice.written:
                    qtype = placed[hf_name]
            plan.tensors.append(PlannedTensor(hf_name, name, ref.shape, qtype, name.startswith("blk."), choice))
        else:
            f32 = gguf_types.TensorTypeChoice(name, "F32", "F32")
            plan.tensors.append(PlannedTensor(hf_name, name, ref.shape, Q.F32, False, f32))
    if needs_rope_freqs(cfg):
        n = len(llama3_rope_factors(cfg))
        rope = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        f32 = gguf_types.TensorTypeChoice(rope, "F32", "F32")
        plan.tensors.append(PlannedTensor(None, rope, (n,), Q.F32, False, f32))
    return plan


def _natural_key(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def _encode(values: np.ndarray, qtype: Q, exact: bool = False) -> np.ndarray:
    """Values -> the bytes ggml stores for them (gguf_stream.encode; a seam for failure tests)."""
    return encode(values, qtype, exact)


def _is_sparse(ckpt: HFCheckpoint, spec: ArchSpec) -> bool:
    manifest = ckpt.manifest
    if manifest is not None:
        return float(manifest.get("sparsity", {}).get("pruned_linears", 0.0)) > 0.0
    first = [n for n, ref in ckpt.tensors.items() if len(ref.shape) == 2 and re.search(r"\.0\.", n)]
    zeros = size = 0
    for name in first:
        z, n = ckpt.count_zeros(name)
        zeros, size = zeros + z, size + n
    return size > 0 and zeros / size >= SPARSE_ZERO_FRACTION


def _write_gguf(
    path: Path, ckpt: HFCheckpoint, spec: ArchSpec, plan: _Plan, vocab: Any, pre: str | None, ftype: int,
    progress: Progress, naming: dict[str, str], verify: bool,
) -> list[Written]:
    w = gguf.GGUFWriter(path, spec.name)
    try:
        for key, value in naming.items():
            getattr(w, NAMING_WRITERS[key])(value)
        w.add_file_type(int(ftype))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        spec.write_hparams(w, ckpt.text_config)
        write_vocab(w, vocab, pre)
        write_dsnot_metadata(w, ckpt.manifest)
        for t in plan.tensors:
            block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
            byte_shape = (*t.shape[:-1], t.shape[-1] // block * type_size)
            w.add_tensor_info(t.gguf_name, byte_shape, np.dtype(np.uint8), t.nbytes, raw_dtype=t.qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        # a checkpoint quantized in refinement may hold blocks at scales ggml would not pick: keep them exact
        exact = bool((ckpt.manifest or {}).get("quantize"))
        with open_bar(progress, "writing tensors", len(plan.tensors), unit="tensor") as bar:
            written = stream_tensors(w, ckpt, spec, plan.tensors, verify, lambda: bar.update(1),
                                     encoder=lambda values, qtype: _encode(values, qtype, exact))
        w.fout[0].flush()
        os.fsync(w.fout[0].fileno())
    finally:
        w.close()
    return written


def _verify(final: Path, ckpt: HFCheckpoint, spec: ArchSpec, plan: _Plan, layout: GGUFLayout,
            written: list[Written], via_llamacpp: bool) -> list[Any]:
    """Zero counts of the decoder weights as the file holds them (see gguf_stream)."""
    if via_llamacpp:  # llama.cpp wrote the file: read it back and compare with the checkpoint
        sources = {t.gguf_name: TensorSource(ckpt, spec, t) for t in plan.tensors if t.pruned}
        return verify_file(final, layout, sources)
    check_layout(final, plan.tensors)
    check_written_bytes(final, layout, written)
    return [w.zeros for w in written if w.zeros is not None]


def export_gguf(checkpoint: str | Path, out: str | Path, config: ExportConfig = ExportConfig()) -> dict[str, Any]:
    """Write ``out`` (GGUF) from the checkpoint directory; return the report (also saved as OUT.export.json)."""
    start = time.perf_counter()
    out = Path(out).expanduser().absolute()
    otype: OutputType = parse_output_type(config.qtype)
    ckpt = open_checkpoint(checkpoint)
    check_output_file(out, config.force)
    remove_stale_temporaries(out)
    spec = find_arch(ckpt.architecture)
    cfg = ckpt.text_config
    if spec.gguf_arch == gguf.MODEL_ARCH.LLAMA and cfg.get("sliding_window"):
        logger.warning("this checkpoint sets sliding_window=%s; llama.cpp's llama architecture attends to the "
                       "full context, so outputs differ beyond the window", cfg["sliding_window"])
    sparse = _is_sparse(ckpt, spec)
    if sparse and not otype.keeps_zeros and not config.allow_zero_loss:
        raise UserInputError(
            f"type {otype.name} does not keep exact zeros ({otype.description}) and {ckpt.root} is sparse; "
            f"use a zero-keeping type ({', '.join(zero_keeping_names())}) "
            f"or pass --allow-zero-loss"
        )
    weight_type = otype.direct if otype.direct is not None else _intermediate_type(ckpt)
    embedding = Q[config.embedding_type] if config.embedding_type else None
    plan = plan_tensors(ckpt, spec, weight_type, otype, embedding)
    for line in gguf_types.summarize_fallbacks(plan.choices().values()):
        logger.warning("%s: %s", otype.name, line)
    times = {"prepare": time.perf_counter() - start}
    tokenizer = load_hf_tokenizer(ckpt.root)
    vocab = build_vocab(ckpt.root, int(cfg["vocab_size"]), tokenizer)
    pre = config.tokenizer_pre
    if pre is None and vocab.model == "gpt2":
        pre = detect_pre(vocab, tokenizer, lambda w: spec.write_hparams(w, cfg), spec.name)
    to_gguf = _name_mapper(spec, int(cfg["num_hidden_layers"]))
    imatrix, imatrix_source = (load_export_imatrix(config.imatrix, ckpt.load_stats, to_gguf)
                               if otype.via_llamacpp else ({}, "not used"))
    times["tokenizer"] = time.perf_counter() - start - sum(times.values())

    first = temporary_path(out, "f" if otype.via_llamacpp else "w")
    final = temporary_path(out, "q") if otype.via_llamacpp else first
    try:
        # the file type of what is streamed: the final type, or the float carrier llama.cpp quantizes from
        ftype = _CARRIER_FTYPES.get(weight_type, otype.ftype) if otype.via_llamacpp else otype.ftype
        naming = naming_keys(ckpt, config.naming, _param_count(plan))
        streamed = _write_gguf(first, ckpt, spec, plan, vocab, pre, ftype, config.progress, naming,
                               config.verify and not otype.via_llamacpp)
        times["write"] = time.perf_counter() - start - sum(times.values())
        native: dict[str, gguf_types.TensorTypeChoice] = {}
        if otype.via_llamacpp:
            overrides = gguf_types.exact_overrides(plan.choices()) if otype.planned else otype.overrides
            if embedding is not None and not otype.planned:
                overrides = tuple((f"^{re.escape(n)}$", embedding) for n in EMBEDDING_NAMES) + tuple(overrides)
            native = {f.name: f.as_choice() for f in llamacpp_quantize(
                first, final, int(otype.ftype), imatrix=imatrix or None, overrides=overrides, pure=otype.pure,
                nthread=config.threads)}
            first.unlink()
            times["llamacpp_quantize"] = time.perf_counter() - start - sum(times.values())
        layout = read_gguf_layout(final)  # the header and tensor table only
        written_types = {ti.name: ti.type_name for ti in layout.tensors}
        tensor_types = dict(sorted(Counter(written_types.values()).items()))
        zeros = _verify(final, ckpt, spec, plan, layout, streamed, otype.via_llamacpp) if config.verify else []
        log_lattice(zeros)
        times["verify"] = time.perf_counter() - start - sum(times.values())
        file_bytes, n_params = final.stat().st_size, _param_count(plan)
        probes = usable_probes(tokenizer)
        mismatches = tokenization_mismatches(final, tokenizer, probes)
        times["tokenizer_check"] = time.perf_counter() - start - sum(times.values())
        report = {
            "tool": {"name": "dsnot-deploy", "version": __version__},
            "versions": runtime_versions(),
            "input": str(ckpt.root),
            "output": str(out),
            "architecture": {"hf": ckpt.architecture, "gguf": spec.name},
            "type": otype.name,
            "type_description": otype.description,
            "naming": naming,
            "tensor_types": tensor_types,
            **gguf_types.type_report(plan.choices(), written_types, native),
            "imatrix": {"source": imatrix_source, "entries": len(imatrix)},
            "sparse_input": sparse,
            "manifest": manifest_summary(ckpt.manifest),
            "tokenizer": {
                "model": vocab.model,
                "pre": pre,
                "probe_texts": len(probes),
                "probe_mismatches": len(mismatches),
            },
            "file_bytes": file_bytes,
            "parameters": n_params,
            "bits_per_weight": 8 * file_bytes / max(n_params, 1),
            "zeros": summarize(zeros) if config.verify else None,  # None: --no-verify
            "zeros_per_tensor": [z.as_dict() for z in zeros],
            "seconds": {**times, "total": time.perf_counter() - start},
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }
        if mismatches:
            logger.warning("llama.cpp tokenizes %d of %d probe texts differently from the HF tokenizer",
                           len(mismatches), len(probes))
        os.replace(final, out)
    except BaseException:
        first.unlink(missing_ok=True)
        final.unlink(missing_ok=True)
        raise
    atomic_write_bytes(report_path(out), (json.dumps(report, indent=2) + "\n").encode())
    return report


def _param_count(plan: _Plan) -> int:
    return sum(int(np.prod(t.shape)) for t in plan.tensors)
