"""The `validate` job: a sparse GGUF against its dense model, both run in llama.cpp on identical tokens.

Per chunk (see :class:`dsnot_deploy.evaluation.llamacpp_runtime.ScoringPlan` for which positions are scored),
the dense and the sparse model decode the same tokens one after the other; the two chunks' scored
logits are compared at once and dropped, so memory holds one chunk's logits per model whatever the
length of the text. For every scored position ``t`` with target ``y``:

- ``nll_m(t) = -log softmax(z_m(t))[y]`` for each model ``m``; ``ppl_m = exp(sum_t nll_m / n)``;
- ``kld(t) = sum_v p_d(v) (log p_d(v) - log p_s(v))``, the KL divergence of the sparse model's
  next-token distribution ``p_s`` from the dense one's ``p_d``; reported as the mean over ``t``
  (and per chunk, and quantiles);
- top-1 agreement: the fraction of ``t`` where ``argmax z_d(t) == argmax z_s(t)``.

Log-softmaxes are taken in float64 from llama.cpp's float32 logits; sums are float64.

The dense side is a GGUF, or a model (checkpoint directory, alias, Hub id) exported here to a GGUF
of the sparse file's type and cached by content hash (:func:`dense_gguf_for`).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.evaluation.dense_cache import dense_gguf_for, export_qtype
from dsnot_deploy.evaluation.gate import GateConfig
from dsnot_deploy.evaluation.logit_metrics import compare_logits
from dsnot_deploy.progress import Progress, open_bar
from dsnot_deploy.protocols import LLAMACPP, parse_protocol

logger = logging.getLogger(__name__)




# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class ValidateConfig:
    """A validation run.

    ``sparse``: the GGUF to validate. ``dense``: a dense GGUF, or a model spec (checkpoint
    directory, alias, Hub id) exported to a GGUF of the sparse file's type. ``text``/``split``: the
    evaluation text source (``dsnot_deploy.sources.textdata``). ``ctx``: tokens per chunk (n_ctx).
    ``checkpoint``: the sparse HF checkpoint, for the torch perplexity of the same tokens (optional).
    ``threads``: llama.cpp threads (default all CPUs). ``cache_dir``: where exported dense GGUFs are
    kept (default ``$XDG_CACHE_HOME/dsnot-deploy/gguf``). ``gpu_layers``: layers llama.cpp offloads
    to a GPU, for both models (0 = CPU, the default; -1 = all); any other value needs a llama.cpp
    build with GPU offload, checked here (``llamacpp_loader.check_gpu_layers``).
    """

    sparse: Path
    dense: str
    text: str = "pydoc"
    split: str | None = None
    protocol: str = LLAMACPP
    ctx: int = 2048
    max_chunks: int | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    checkpoint: Path | None = None
    threads: int | None = None
    cache_dir: Path | None = None
    progress: Progress = True
    gpu_layers: int = 0

    def __post_init__(self) -> None:
        parse_protocol(self.protocol)
        minimum = 3 if self.protocol == LLAMACPP else 2
        if self.ctx < minimum:
            raise UserInputError(f"expected --ctx >= {minimum} for the {self.protocol} protocol, found {self.ctx}")
        if self.max_chunks is not None and self.max_chunks < 1:
            raise UserInputError(f"expected --max-chunks >= 1, found {self.max_chunks}")
        if self.threads is not None and self.threads < 1:
            raise UserInputError(f"expected --threads >= 1, found {self.threads}")
        if not str(self.dense).strip():
            raise UserInputError("expected --dense to name a dense GGUF or model, found an empty string")
        if self.checkpoint is not None and not (Path(self.checkpoint) / "config.json").is_file():
            raise UserInputError(f"expected --checkpoint to be a checkpoint directory with config.json, found {self.checkpoint}")
        from converters.llamacpp_loader import check_gpu_layers

        check_gpu_layers(self.gpu_layers)  # imports llama.cpp only when layers are to be offloaded


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class SideResult:
    """One model's perplexity in llama.cpp. ``decode_seconds``: llama.cpp decode time alone;
    ``tokens_per_second``: tokens fed to the model per second of decoding."""

    path: str
    ppl: float
    nll_sum: float
    n_scored: int
    per_chunk_ppl: tuple[float, ...]
    decode_seconds: float
    tokens_per_second: float


@dataclass(frozen=True)
class ValidationResult:
    """Everything measured by :func:`run_validation` (see the module docstring for the metrics).

    ``tokens_per_second``: tokens decoded by llama.cpp (both models) per second of the whole
    comparison loop, metrics included. ``metric_seconds``: time spent on log-softmaxes, NLL, KLD
    and top-1. ``torch``: the torch perplexity of the sparse checkpoint on the same tokens (or None).
    """

    protocol: str
    ctx: int
    n_chunks: int
    n_text_tokens: int
    scored_per_chunk: int
    bos_replacement: int | None
    dense: SideResult
    sparse: SideResult
    ppl_ratio: float
    ppl_increase: float
    kld_mean: float
    kld_per_chunk: tuple[float, ...]
    kld_quantiles: dict[str, float]
    top1: float
    top1_per_chunk: tuple[float, ...]
    loop_seconds: float
    metric_seconds: float
    tokens_per_second: float
    torch: dict[str, Any] | None = None


# --------------------------------------------------------------------------- the job


@dataclass(frozen=True)
class _ChildJob:
    """What the llama.cpp child of :func:`run_validation` needs (picklable)."""

    sparse: str
    sparse_qtype: str
    dense: str
    dense_qtype: str
    text: str
    protocol: str
    ctx: int
    max_chunks: int | None
    threads: int | None
    gpu_layers: int = 0


def _score_in_child(reporter: Any, job: _ChildJob) -> None:
    """Runs in the llama.cpp child (``llamacpp_child.run_isolated``): both models on the same chunks.

    Sends ``("plan", ids, plan, n_chunks)`` once, then per chunk ``("chunk", ChunkComparison,
    dense decode s, sparse decode s, metric s)``; announces every load and decode as a phase so that a
    crash names the file it happened in.
    """
    from dsnot_deploy.evaluation.llamacpp_runtime import GGUFModel, ScoringPlan

    reporter.phase("loading", job.sparse, job.sparse_qtype)
    with GGUFModel(Path(job.sparse), job.ctx, job.threads, gpu_layers=job.gpu_layers) as sparse:
        reporter.phase("loading", job.dense, job.dense_qtype)
        with GGUFModel(Path(job.dense), job.ctx, job.threads, gpu_layers=job.gpu_layers) as dense:
            if sparse.n_vocab != dense.n_vocab:
                raise UserInputError(f"expected the same vocabulary size, found {dense.n_vocab} (dense) vs "
                                     f"{sparse.n_vocab} (sparse)")
            reporter.phase("tokenizing with", job.sparse, job.sparse_qtype)
            ids = sparse.tokenize(job.text)
            bos = sparse.bos_id if (job.protocol == LLAMACPP and sparse.adds_bos) else None
            plan = ScoringPlan.for_protocol(job.protocol, job.ctx, bos)
            n_chunks = plan.n_chunks(int(ids.shape[0]), job.max_chunks)
            reporter.send("plan", ids, plan, n_chunks)
            dense_chunks = dense.iter_chunks(ids, plan, n_chunks)
            sparse_chunks = sparse.iter_chunks(ids, plan, n_chunks)
            for _ in range(n_chunks):
                reporter.phase("decoding", job.dense, job.dense_qtype)
                out_d = next(dense_chunks)
                reporter.phase("decoding", job.sparse, job.sparse_qtype)
                out_s = next(sparse_chunks)
                t0 = time.perf_counter()
                cmp = compare_logits(out_d.logits, out_s.logits, out_d.targets)
                reporter.send("chunk", cmp, out_d.seconds, out_s.seconds, time.perf_counter() - t0)


def run_validation(config: ValidateConfig) -> tuple[ValidationResult, dict[str, Any]]:
    """Run the comparison; return the result and the context for the report (files, GGUF infos,
    how the dense side was obtained, the text).

    llama.cpp runs in a child process (:mod:`dsnot_deploy.evaluation.llamacpp_child`): a native crash there
    raises ``LlamaCppCrash`` (one line naming the file, its type and the llama.cpp version) before
    anything is reported.
    """
    from converters.gguf_info import check_same_vocabulary, read_gguf_info
    from converters.llamacpp_loader import describe_runtime
    from dsnot_deploy.evaluation.llamacpp_child import run_isolated
    from dsnot_deploy.sources.textdata import load_text_source

    sparse_info = read_gguf_info(config.sparse)  # bad input first: not a file, not a GGUF
    text_source = load_text_source(config.text, config.split)
    qtype = export_qtype(sparse_info.path, sparse_info)
    dense_path, dense_origin = dense_gguf_for(config.dense, qtype, config.cache_dir, config.progress)
    dense_info = read_gguf_info(dense_path)
    check_same_vocabulary(dense_info, sparse_info)
    text = text_source.eval_text(config.protocol)

    t_start = time.perf_counter()
    job = _ChildJob(sparse=str(sparse_info.path), sparse_qtype=sparse_info.file_type_name, dense=str(dense_path),
                    dense_qtype=dense_info.file_type_name, text=text, protocol=config.protocol, ctx=config.ctx,
                    max_chunks=config.max_chunks, threads=config.threads, gpu_layers=config.gpu_layers)
    state: dict[str, Any] = {"chunks": []}
    bar: list[Any] = []

    def receive(message: tuple[Any, ...]) -> None:
        if message[0] == "plan":
            _, state["ids"], state["plan"], state["n_chunks"] = message
            plan = state["plan"]
            logger.info("validate (%s): %d chunks of %d tokens (%d in the text), %d scored per chunk",
                        config.protocol, state["n_chunks"], config.ctx, state["ids"].shape[0], plan.scored_per_chunk)
            bar.append(open_bar(config.progress, "validate", state["n_chunks"]))
            state["t_loop"] = time.perf_counter()
        elif message[0] == "chunk":
            state["chunks"].append(message[1:])
            bar[0].update(1)

    try:
        run_isolated(_score_in_child, job, on_message=receive)
    finally:
        for b in bar:
            b.close()
    loop_seconds = time.perf_counter() - state.get("t_loop", t_start)
    ids, plan, n_chunks = state["ids"], state["plan"], state["n_chunks"]
    bos = plan.bos_id
    nll_d = nll_s = 0.0
    chunk_d: list[float] = []
    chunk_s: list[float] = []
    kld_chunks: list[np.ndarray] = []
    top1_chunks: list[int] = []
    t_decode_d = t_decode_s = t_metric = 0.0
    for cmp, seconds_d, seconds_s, seconds_metric in state["chunks"]:
        t_metric += seconds_metric
        t_decode_d += seconds_d
        t_decode_s += seconds_s
        nll_d += cmp.nll_dense
        nll_s += cmp.nll_sparse
        chunk_d.append(math.exp(cmp.nll_dense / plan.scored_per_chunk))
        chunk_s.append(math.exp(cmp.nll_sparse / plan.scored_per_chunk))
        kld_chunks.append(cmp.kld)
        top1_chunks.append(cmp.top1_matches)
    n_scored = n_chunks * plan.scored_per_chunk
    fed = n_chunks * config.ctx
    dense_side = SideResult(str(dense_path), math.exp(nll_d / n_scored), nll_d, n_scored, tuple(chunk_d),
                            t_decode_d, fed / t_decode_d if t_decode_d > 0 else math.inf)
    sparse_side = SideResult(str(sparse_info.path), math.exp(nll_s / n_scored), nll_s, n_scored, tuple(chunk_s),
                             t_decode_s, fed / t_decode_s if t_decode_s > 0 else math.inf)
    kld_all = np.concatenate(kld_chunks)
    torch_ref = None
    if config.checkpoint is not None:
        torch_ref = torch_reference(config.checkpoint, ids, plan, n_chunks, config.progress)
        torch_ref["relative_difference"] = sparse_side.ppl / torch_ref["ppl"] - 1
    result = ValidationResult(
        protocol=config.protocol,
        ctx=config.ctx,
        n_chunks=n_chunks,
        n_text_tokens=int(ids.shape[0]),
        scored_per_chunk=plan.scored_per_chunk,
        bos_replacement=bos,
        dense=dense_side,
        sparse=sparse_side,
        ppl_ratio=sparse_side.ppl / dense_side.ppl,
        ppl_increase=sparse_side.ppl - dense_side.ppl,
        kld_mean=float(kld_all.mean()),
        kld_per_chunk=tuple(float(k.mean()) for k in kld_chunks),
        kld_quantiles={q: float(np.quantile(kld_all, v)) for q, v in
                       (("median", 0.5), ("p90", 0.9), ("p99", 0.99), ("max", 1.0))},
        top1=sum(top1_chunks) / n_scored,
        top1_per_chunk=tuple(m / plan.scored_per_chunk for m in top1_chunks),
        loop_seconds=loop_seconds,
        metric_seconds=t_metric,
        tokens_per_second=2 * fed / loop_seconds if loop_seconds > 0 else math.inf,
        torch=torch_ref,
    )
    context = {
        "sparse_info": sparse_info,
        "dense_info": dense_info,
        "dense_origin": dense_origin,
        "qtype": qtype,
        "text_name": text_source.name,
        "text_chars": len(text),
        "seconds_total": time.perf_counter() - t_start,
        "runtime": describe_runtime(),
    }
    logger.info("validate: dense ppl %.4f, sparse ppl %.4f, KLD %.5f, top-1 %.4f",
                dense_side.ppl, sparse_side.ppl, result.kld_mean, result.top1)
    return result, context


def torch_reference(checkpoint: Path, ids: np.ndarray, plan: Any, n_chunks: int, progress: Progress) -> dict[str, Any]:
    """Perplexity of the HF checkpoint in torch (float32, CPU) on the very same token ids and positions,
    with ``dsnot_deploy.evaluation.perplexity``'s implementation of the protocol."""
    import torch

    from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp, perplexity_paper
    from dsnot_deploy.sources.models import load_model

    loaded = load_model(str(checkpoint))
    tensor = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if plan.protocol == LLAMACPP:
        res = perplexity_llamacpp(loaded.model, tensor, plan.ctx, plan.bos_id, max_chunks=n_chunks, progress=progress)
    else:
        res = perplexity_paper(loaded.model, tensor, plan.ctx, max_chunks=n_chunks, progress=progress)
    return {"checkpoint": str(checkpoint), "ppl": res.ppl, "n_scored": res.n_scored,
            "per_chunk_ppl": list(res.per_chunk_ppl), "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
            "dtype": "float32"}
