"""The `validate` job: a sparse GGUF against its dense model, both run in llama.cpp on identical tokens.

Per chunk (see :class:`dsnot_deploy.llamacpp_runtime.ScoringPlan` for which positions are scored),
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

import hashlib
import logging
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UserInputError

logger = logging.getLogger(__name__)

PROTOCOLS = ("llamacpp", "paper")

# float64 elements per block of rows when comparing logits: bounds each temporary to 32 MiB
# (a few are alive at once), whatever the vocabulary.
_BLOCK_ELEMENTS = 1 << 22

# Checkpoint files that define a dense model's content (weights, config, tokenizer).
_CHECKPOINT_SUFFIXES = (".safetensors", ".json", ".model", ".txt", ".bin", ".tiktoken")
_CACHE_FORMAT = "dsnot-dense-gguf-v1"


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GateConfig:
    """Thresholds; each None is not checked.

    ``max_ppl_ratio``: sparse ppl / dense ppl must be <= this. ``max_ppl_increase``: sparse ppl -
    dense ppl (perplexity points) must be <= this. ``max_kld``: mean KL(dense || sparse) in nats must
    be <= this. ``min_top1``: top-1 agreement, a fraction in [0, 1], must be >= this.
    """

    max_ppl_ratio: float | None = None
    max_ppl_increase: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None

    def __post_init__(self) -> None:
        if self.max_ppl_ratio is not None and not self.max_ppl_ratio > 0:
            raise UserInputError(f"expected --max-ppl-ratio > 0, found {self.max_ppl_ratio}")
        if self.max_ppl_increase is not None and not math.isfinite(self.max_ppl_increase):
            raise UserInputError(f"expected a finite --max-ppl-increase, found {self.max_ppl_increase}")
        if self.max_kld is not None and not self.max_kld >= 0:
            raise UserInputError(f"expected --max-kld >= 0, found {self.max_kld}")
        if self.min_top1 is not None and not 0 <= self.min_top1 <= 1:
            raise UserInputError(f"expected --min-top1 as a fraction in [0, 1] (0.9 = 90%), found {self.min_top1}")

    @property
    def empty(self) -> bool:
        return all(v is None for v in (self.max_ppl_ratio, self.max_ppl_increase, self.max_kld, self.min_top1))

    def check(self, result: ValidationResult) -> list[GateCheck]:
        """One :class:`GateCheck` per given threshold, in a fixed order."""
        checks = []
        if self.max_ppl_ratio is not None:
            checks.append(GateCheck("ppl ratio (sparse/dense)", result.ppl_ratio, self.max_ppl_ratio, "<=", "--max-ppl-ratio"))
        if self.max_ppl_increase is not None:
            checks.append(GateCheck("ppl increase (sparse-dense)", result.ppl_increase, self.max_ppl_increase, "<=",
                                    "--max-ppl-increase"))
        if self.max_kld is not None:
            checks.append(GateCheck("mean KLD", result.kld_mean, self.max_kld, "<=", "--max-kld"))
        if self.min_top1 is not None:
            checks.append(GateCheck("top-1 agreement", result.top1, self.min_top1, ">=", "--min-top1"))
        return checks


@dataclass(frozen=True)
class GateCheck:
    """One threshold against its measured value."""

    name: str
    value: float
    threshold: float
    comparison: str  # "<=" or ">="
    option: str

    @property
    def passed(self) -> bool:
        if math.isnan(self.value):
            return False
        return self.value <= self.threshold if self.comparison == "<=" else self.value >= self.threshold

    @property
    def margin(self) -> float:
        """How far inside the threshold the value is (negative: by how much it fails)."""
        return self.threshold - self.value if self.comparison == "<=" else self.value - self.threshold

    def message(self) -> str:
        verdict = "pass" if self.passed else "FAIL"
        how = "within" if self.passed else "over" if self.comparison == "<=" else "under"
        return (f"{verdict}: {self.name} {self.value:.6g} {self.comparison} {self.threshold:.6g} ({self.option}): "
                f"{how} by {abs(self.margin):.6g}")

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "option": self.option, "value": self.value, "threshold": self.threshold,
                "comparison": self.comparison, "passed": self.passed, "margin": self.margin}


@dataclass(frozen=True)
class ValidateConfig:
    """A validation run.

    ``sparse``: the GGUF to validate. ``dense``: a dense GGUF, or a model spec (checkpoint
    directory, alias, Hub id) exported to a GGUF of the sparse file's type. ``text``/``split``: the
    evaluation text source (``dsnot_deploy.textdata``). ``ctx``: tokens per chunk (n_ctx).
    ``checkpoint``: the sparse HF checkpoint, for the torch perplexity of the same tokens (optional).
    ``threads``: llama.cpp threads (default all CPUs). ``cache_dir``: where exported dense GGUFs are
    kept (default ``$XDG_CACHE_HOME/dsnot-deploy/gguf``).
    """

    sparse: Path
    dense: str
    text: str = "pydoc"
    split: str | None = None
    protocol: str = "llamacpp"
    ctx: int = 2048
    max_chunks: int | None = None
    gate: GateConfig = field(default_factory=GateConfig)
    checkpoint: Path | None = None
    threads: int | None = None
    cache_dir: Path | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise UserInputError(f"expected --protocol in {PROTOCOLS}, found {self.protocol!r}")
        minimum = 3 if self.protocol == "llamacpp" else 2
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


@dataclass(frozen=True)
class ChunkComparison:
    """Sums over one chunk's scored positions (float64)."""

    nll_dense: float
    nll_sparse: float
    kld: np.ndarray  # (scored,) per position
    top1_matches: int


def compare_logits(dense: np.ndarray, sparse: np.ndarray, targets: np.ndarray) -> ChunkComparison:
    """NLL of both models, per-position KL(dense || sparse) and top-1 matches over aligned rows.

    ``dense`` and ``sparse`` are ``(rows, vocab)`` logits, ``targets`` ``(rows,)`` the next tokens.
    Rows are processed in blocks in float64: with ``a = z - max(z)``, ``log Z = log sum exp(a)``,
    ``nll = log Z - a[y]`` and ``kld = sum p_d (a_d - a_s) - log Z_d + log Z_s``.
    """
    if dense.shape != sparse.shape or dense.ndim != 2 or targets.shape != (dense.shape[0],):
        raise UserInputError(f"expected aligned (rows, vocab) logits and (rows,) targets, found "
                             f"{dense.shape}, {sparse.shape}, {targets.shape}")
    rows, vocab = dense.shape
    block = max(1, _BLOCK_ELEMENTS // vocab)
    nll_d = nll_s = 0.0
    kld = np.empty(rows, dtype=np.float64)
    matches = 0
    for r in range(0, rows, block):
        zd = dense[r : r + block]  # (b, vocab) float32
        zs = sparse[r : r + block]
        y = targets[r : r + block]
        idx = np.arange(zd.shape[0])
        matches += int((zd.argmax(axis=1) == zs.argmax(axis=1)).sum())
        ad = zd.astype(np.float64)
        ad -= ad.max(axis=1, keepdims=True)
        as_ = zs.astype(np.float64)
        as_ -= as_.max(axis=1, keepdims=True)
        pd = np.exp(ad)  # unnormalised dense probabilities
        sum_d = pd.sum(axis=1)
        log_zd = np.log(sum_d)
        log_zs = np.log(np.exp(as_).sum(axis=1))
        nll_d += float((log_zd - ad[idx, y]).sum())
        nll_s += float((log_zs - as_[idx, y]).sum())
        ad -= as_  # a_d - a_s
        kld[r : r + block] = np.einsum("ij,ij->i", pd, ad) / sum_d - log_zd + log_zs
    np.maximum(kld, 0.0, out=kld)  # rounding can leave -1e-17 for identical rows
    return ChunkComparison(nll_dense=nll_d, nll_sparse=nll_s, kld=kld, top1_matches=matches)


# --------------------------------------------------------------------------- dense GGUF


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/dsnot-deploy/gguf`` (``~/.cache/dsnot-deploy/gguf`` when unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsnot-deploy" / "gguf"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def checkpoint_digest(directory: Path) -> str:
    """sha256 over the names and contents of a checkpoint's weight, config and tokenizer files."""
    digest = hashlib.sha256()
    files = sorted(p for p in Path(directory).rglob("*")
                   if p.is_file() and p.suffix in _CHECKPOINT_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise UserInputError(f"expected weight/config files in the checkpoint {directory}, found none")
    for path in files:
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + sha256_file(path).encode() + b"\n")
    return digest.hexdigest()


def dense_gguf_for(spec: str, qtype: str, cache_dir: Path | None = None, progress: bool = True,
                   gguf_as_is: bool = True) -> tuple[Path, dict[str, Any]]:
    """The dense GGUF to compare with: ``spec`` itself if it is a GGUF file (and ``gguf_as_is``),
    else ``spec`` exported.

    A model spec (checkpoint directory, alias, GGUF file, Hub id; see ``dsnot_deploy.models``) is
    exported at ``qtype`` with ``converters.gguf_export`` into ``cache_dir`` under a name derived from
    the sha256 of its content (the checkpoint files, or the GGUF file it is dequantized from) and
    ``qtype``, so a second run reuses it. A GGUF source is dequantized and saved as a checkpoint
    first (as ``refine`` reads it). The file appears atomically (exported in a temporary folder of the
    cache, then renamed). Returns the path and a description for the report.
    """
    path = Path(spec).expanduser()
    if gguf_as_is and path.is_file():
        from .llamacpp_runtime import check_gguf_file

        return check_gguf_file(path, "dense GGUF"), {"kind": "gguf", "spec": spec}
    from .models import resolve_model_source

    source = resolve_model_source(spec)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".dense-", dir=cache_dir))
    try:
        if source.kind == "local-dir":
            checkpoint, content = Path(source.location), None
        elif source.kind in ("alias-gguf", "gguf") and source.path is not None:
            checkpoint, content = None, "gguf:" + sha256_file(source.path)
        else:
            checkpoint, content = _save_model(spec, staging / "checkpoint"), None
        if content is None:
            content = "checkpoint:" + checkpoint_digest(checkpoint)
        key = hashlib.sha256(f"{_CACHE_FORMAT}\n{content}\n{qtype}".encode()).hexdigest()[:32]
        target = cache_dir / f"dense-{key}-{qtype}.gguf"
        info = {"kind": source.kind, "spec": spec, "qtype": qtype, "content": content, "cache": str(target)}
        if target.is_file():
            logger.info("dense GGUF from cache: %s", target)
            return target, {**info, "cached": True}
        if checkpoint is None:
            checkpoint = _save_model(spec, staging / "checkpoint")
        from converters.gguf_export import ExportConfig, export_gguf

        logger.info("exporting the dense model %s to %s (%s)", spec, target.name, qtype)
        out = staging / target.name
        report = export_gguf(checkpoint, out, ExportConfig(qtype=qtype, progress=progress))
        os.replace(out, target)
        return target, {**info, "cached": False, "export": _small(report)}
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _save_model(spec: str, outdir: Path) -> Path:
    """Load ``spec`` (alias GGUF dequantized, Hub id) and save it as a plain HF checkpoint."""
    from .models import load_model, save_checkpoint

    loaded = load_model(spec)
    save_checkpoint(loaded.model, loaded.tokenizer, outdir)
    return outdir


def _small(report: Any) -> Any:
    """An export report without bulky per-tensor lists (kept in the exporter's own JSON)."""
    if not isinstance(report, dict):
        return report
    return {k: v for k, v in report.items() if not (isinstance(v, list) and len(v) > 64)}


def export_qtype(sparse: Path, info: Any) -> str:
    """The type name to export the dense model at: the sparse file's export record if it has one
    (``SPARSE.gguf.export.json``, written by the exporter), else its ``general.file_type``."""
    import json

    record = Path(str(sparse) + ".export.json")
    if record.is_file():
        try:
            data = json.loads(record.read_text())
        except (OSError, ValueError):
            data = {}
        for key in ("qtype", "type"):
            value = data.get(key) or (data.get("config") or {}).get(key)
            if isinstance(value, str) and value:
                return value
    return info.file_type_name


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


def _score_in_child(reporter: Any, job: _ChildJob) -> None:
    """Runs in the llama.cpp child (``llamacpp_child.run_isolated``): both models on the same chunks.

    Sends ``("plan", ids, plan, n_chunks)`` once, then per chunk ``("chunk", ChunkComparison,
    dense decode s, sparse decode s, metric s)``; announces every load and decode as a phase so that a
    crash names the file it happened in.
    """
    from .llamacpp_runtime import GGUFModel, ScoringPlan

    reporter.phase("loading", job.sparse, job.sparse_qtype)
    with GGUFModel(Path(job.sparse), job.ctx, job.threads) as sparse:
        reporter.phase("loading", job.dense, job.dense_qtype)
        with GGUFModel(Path(job.dense), job.ctx, job.threads) as dense:
            if sparse.n_vocab != dense.n_vocab:
                raise UserInputError(f"expected the same vocabulary size, found {dense.n_vocab} (dense) vs "
                                     f"{sparse.n_vocab} (sparse)")
            reporter.phase("tokenizing with", job.sparse, job.sparse_qtype)
            ids = sparse.tokenize(job.text)
            bos = sparse.bos_id if (job.protocol == "llamacpp" and sparse.adds_bos) else None
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

    llama.cpp runs in a child process (:mod:`dsnot_deploy.llamacpp_child`): a native crash there
    raises ``LlamaCppCrash`` (one line naming the file, its type and the llama.cpp version) before
    anything is reported.
    """
    from tqdm.auto import tqdm

    from .llamacpp_child import run_isolated
    from .llamacpp_loader import describe_runtime
    from .llamacpp_runtime import check_same_vocabulary, read_gguf_info
    from .textdata import load_text_source

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
                    max_chunks=config.max_chunks, threads=config.threads)
    state: dict[str, Any] = {"chunks": []}
    bar: list[Any] = []

    def receive(message: tuple[Any, ...]) -> None:
        if message[0] == "plan":
            _, state["ids"], state["plan"], state["n_chunks"] = message
            plan = state["plan"]
            logger.info("validate (%s): %d chunks of %d tokens (%d in the text), %d scored per chunk",
                        config.protocol, state["n_chunks"], config.ctx, state["ids"].shape[0], plan.scored_per_chunk)
            bar.append(tqdm(total=state["n_chunks"], desc="validate", disable=not config.progress))
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


def torch_reference(checkpoint: Path, ids: np.ndarray, plan: Any, n_chunks: int, progress: bool) -> dict[str, Any]:
    """Perplexity of the HF checkpoint in torch (float32, CPU) on the very same token ids and positions,
    with ``dsnot_deploy.perplexity``'s implementation of the protocol."""
    import torch

    from .models import load_model
    from .perplexity import perplexity_llamacpp, perplexity_paper

    loaded = load_model(str(checkpoint))
    tensor = torch.from_numpy(np.asarray(ids, dtype=np.int64))
    if plan.protocol == "llamacpp":
        res = perplexity_llamacpp(loaded.model, tensor, plan.ctx, plan.bos_id, max_chunks=n_chunks, progress=progress)
    else:
        res = perplexity_paper(loaded.model, tensor, plan.ctx, max_chunks=n_chunks, progress=progress)
    return {"checkpoint": str(checkpoint), "ppl": res.ppl, "n_scored": res.n_scored,
            "per_chunk_ppl": list(res.per_chunk_ppl), "seconds": res.seconds, "tokens_per_second": res.tokens_per_second,
            "dtype": "float32"}
