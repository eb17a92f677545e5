"""Measure a frontier: for each point, its checkpoint (the dense model, or a refine job), the GGUF
(`converters.gguf_export.export_gguf`, as `dsnot-deploy export`), the pack (`converters.sparse_pack`,
as `dsnot-deploy pack`) and its llama.cpp perplexity (in a crash-isolated child,
`evaluation.llamacpp_child`, with validate's runtime and scoring plan).

Work files live in ``OUTDIR/work``: one checkpoint per state (kept until every row of the state is
measured), the GGUF and pack of the point being measured (deleted after measuring unless
``keep_files``). A point whose row is already in ``OUTDIR/frontier.json`` (measured with the same
settings) is not measured again unless ``force``. The reports are rewritten after every row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.errors import DsnotError, UserInputError
from dsnot_deploy.frontier.plan import REFERENCE_TYPE, FrontierPoint
from dsnot_deploy.progress import Progress, open_bar
from dsnot_deploy.protocols import LLAMACPP, parse_protocol

log = logging.getLogger(__name__)

JSON_NAME = "frontier.json"


@dataclass(frozen=True)
class EvalSettings:
    """The perplexity protocol (as `validate`'s options): text source, split, protocol, tokens per
    chunk, chunks at most, llama.cpp threads and offloaded layers."""

    text: str = "pydoc"
    split: str | None = None
    protocol: str = LLAMACPP
    ctx: int = 512
    max_chunks: int | None = 16
    threads: int | None = None
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


@dataclass(frozen=True)
class FrontierJob:
    """One frontier run. ``refine``: the template refine job (a ``layerwise.refine.RefineJob``: model,
    pruning and refinement settings, calibration, dtype, device); each sparse state replaces its
    pattern, ``outdir`` and ``quantize``. ``quantize``: the template ``quant.gptq.QuantizeConfig`` of the
    in-refinement-quantized points (its type replaced per point). ``pack_levels``: a
    ``converters.pack_records.PackLevels``. ``export_threads``: llama.cpp quantizer threads (0 = all)."""

    model: str
    outdir: Path
    points: tuple[FrontierPoint, ...]
    refine: Any
    quantize: Any
    eval: EvalSettings
    pack_levels: Any
    pack_levels_name: str = "fast"
    force: bool = False
    keep_files: bool = False
    export_threads: int = 0
    progress: Progress = False

    def __post_init__(self) -> None:
        if not self.points or self.points[0] != FrontierPoint(None, REFERENCE_TYPE):
            raise UserInputError(f"expected the dense {REFERENCE_TYPE} reference as the first point")
        if any(p.quantized for p in self.points) and self.refine.dtype != "float32":
            raise UserInputError(f"expected --dtype float32 for in-refinement quantization; found --dtype "
                                 f"{self.refine.dtype} (or turn that arm off with --no-refine-quantize)")


def settings_of(job: FrontierJob) -> dict[str, Any]:
    """What a row's numbers depend on besides its point: rows measured under other settings are not reused."""
    prune = dataclasses.asdict(job.refine.prune)
    prune.pop("pattern", None)
    return json.loads(json.dumps({
        "model": job.model, "calibration": dataclasses.asdict(job.refine.calibration), "prune": prune,
        "dtype": job.refine.dtype, "quantize": {k: v for k, v in dataclasses.asdict(job.quantize).items() if k != "type"},
        "eval": dataclasses.asdict(job.eval), "pack": {"levels": dataclasses.asdict(job.pack_levels),
                                                       "name": job.pack_levels_name},
    }, default=str))


def load_rows(job: FrontierJob) -> dict[str, dict[str, Any]]:
    """The rows of an earlier run into the same OUTDIR, by key (none with ``force``)."""
    path = job.outdir / JSON_NAME
    if job.force or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        rows, settings = data["rows"], data["settings"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserInputError(f"expected {path} to be a frontier written by this command; could not read it ({exc}); "
                             "pass --force to start over") from None
    mine = settings_of(job)
    # only rows refined with --quantize depend on the quantization settings
    ignore = set() if any(str(r.get("key", "")).endswith("-rq") for r in rows) else {"quantize"}
    differ = sorted(k for k in set(settings) | set(mine) if k not in ignore and settings.get(k) != mine.get(k))
    if differ:
        raise UserInputError(f"{path} holds rows measured with other settings ({', '.join(differ)}); pass --force "
                             "to measure again, or choose another OUTDIR")
    return {r["key"]: {k: v for k, v in r.items() if not k.startswith("on_") and k not in ("ratio",)} for r in rows}


def run_frontier(job: FrontierJob) -> list[dict[str, Any]]:
    """Measure every point not measured yet, writing the reports after each; return the rows in
    the plan's order (see the module docstring)."""
    from dsnot_deploy.atomic import remove_tree
    from dsnot_deploy.frontier.report import write_reports
    from dsnot_deploy.sources.textdata import load_text_source

    text = load_text_source(job.eval.text, job.eval.split).eval_text(job.eval.protocol)  # bad input first
    rows = load_rows(job)
    job.outdir.mkdir(parents=True, exist_ok=True)
    work = job.outdir / "work"
    work.mkdir(exist_ok=True)
    settings = settings_of(job)
    states: dict[str, list[FrontierPoint]] = {}
    for p in job.points:
        states.setdefault(p.state, []).append(p)
    with open_bar(job.progress, "frontier", len(job.points)) as bar:
        bar.update(sum(p.key in rows for p in job.points))
        for state, points in states.items():
            pending = [p for p in points if p.key not in rows]
            ckpt = work / f"ckpt-{state}"
            if pending:
                if job.force and ckpt.exists():
                    remove_tree(ckpt)
                t0 = time.perf_counter()
                manifest = _checkpoint(job, points[0], ckpt)
                seconds = time.perf_counter() - t0
                for p in pending:
                    rows[p.key] = _measure(job, p, ckpt, manifest, text, work, seconds)
                    _check_tokens(rows)
                    write_reports([rows[q.key] for q in job.points if q.key in rows], settings, job.outdir)
                    bar.update(1)
            if not job.keep_files and ckpt.exists():
                remove_tree(ckpt)
    return [rows[p.key] for p in job.points]


def _checkpoint(job: FrontierJob, point: FrontierPoint, ckpt: Path) -> dict[str, Any] | None:
    """The state's checkpoint in ``ckpt`` (reused when a killed run left it complete); its manifest."""
    manifest_file = ckpt / "sparsity.json"
    if point.dense:
        if not (ckpt / "config.json").is_file():
            from dsnot_deploy.sources.materialize import save_as_checkpoint

            log.info("frontier: saving the dense model %s as a checkpoint", job.model)
            save_as_checkpoint(job.model, ckpt)
        return None
    if not manifest_file.is_file():  # refine writes the whole folder atomically, the manifest last
        from dsnot_deploy.algorithms.config import SparsityPattern
        from dsnot_deploy.layerwise.refine import refine

        prune = dataclasses.replace(job.refine.prune, pattern=SparsityPattern.parse(point.sparsity or ""))
        quantize = dataclasses.replace(job.quantize, type=point.qtype) if point.quantized else None
        log.info("frontier: refining %s at %s%s", job.model, point.sparsity,
                 f" with quantization onto {point.qtype}" if quantize else "")
        refine(dataclasses.replace(job.refine, model=job.model, outdir=ckpt, prune=prune, quantize=quantize,
                                   force=True, save_state=False, resume=False))
    return json.loads(manifest_file.read_text())


def _measure(job: FrontierJob, point: FrontierPoint, ckpt: Path, manifest: dict[str, Any] | None, text: str,
             work: Path, checkpoint_seconds: float) -> dict[str, Any]:
    """Export, pack and score one point; delete its files unless ``keep_files``."""
    from converters.gguf_export import ExportConfig, export_gguf, report_path
    from converters.sparse_pack import pack_gguf
    from dsnot_deploy.atomic import remove_stale_temporaries

    gguf = work / f"{point.key}.gguf"
    pack = work / f"{point.key}.pack"
    for path in (gguf, pack):
        remove_stale_temporaries(path)  # a killed earlier run's temporaries
    t0 = time.perf_counter()
    report = export_gguf(ckpt, gguf, ExportConfig(qtype=point.qtype, force=True, progress=job.progress,
                                                  threads=job.export_threads))
    t1 = time.perf_counter()
    summary = pack_gguf(gguf, pack, force=True, levels=job.pack_levels, progress=job.progress)
    t2 = time.perf_counter()
    ppl = perplexity(gguf, point.label, text, job.eval, job.progress)
    t3 = time.perf_counter()
    zeros = report.get("zeros", {}) if isinstance(report, dict) else {}
    row: dict[str, Any] = {
        "key": point.key, "label": point.label, "sparsity": point.sparsity, "type": point.qtype,
        "quantized": point.quantized, "gguf_bytes": gguf.stat().st_size, "pack_bytes": summary.pack_size,
        **ppl,
        "sparsity_achieved": None if manifest is None else manifest["sparsity"].get("pruned_linears"),
        "on_lattice": ([zeros.get("tensors_written_exactly"), zeros.get("tensors")] if point.quantized else None),
        "seconds": {"checkpoint": checkpoint_seconds, "export": t1 - t0, "pack": t2 - t1, "perplexity": t3 - t2},
    }
    if manifest is not None and point.quantized and "quantize" in manifest:
        q = manifest["quantize"]
        row["quantize"] = {k: q.get(k) for k in ("linears_quantized", "linears_gptq", "mean_relative_error_rtn",
                                                 "mean_relative_error")}
    log.info("frontier: %s: GGUF %.1f MiB, pack %.1f MiB, ppl %.4f", point.label, row["gguf_bytes"] / 2**20,
             row["pack_bytes"] / 2**20, row["ppl"])
    if not job.keep_files:
        for path in (gguf, pack, report_path(gguf)):
            path.unlink(missing_ok=True)
    return row


def _check_tokens(rows: dict[str, dict[str, Any]]) -> None:
    """Every file must have been scored on the dense reference's tokens."""
    ref = rows.get(FrontierPoint(None, REFERENCE_TYPE).key)
    if ref is None:
        return
    for key, row in rows.items():
        if (row["tokens_sha256"], row["n_scored"]) != (ref["tokens_sha256"], ref["n_scored"]):
            raise DsnotError(f"{key} was scored on other tokens than the dense {REFERENCE_TYPE} reference "
                             f"({row['n_scored']} vs {ref['n_scored']} scored); its tokenizer differs")


# --------------------------------------------------------------------------- llama.cpp perplexity


@dataclass(frozen=True)
class _ChildJob:
    path: str
    qtype: str
    text: str
    protocol: str
    ctx: int
    max_chunks: int | None
    threads: int | None
    gpu_layers: int


def chunk_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    """Sum over rows of ``-log softmax(logits)[target]``, in float64 (validate's formula)."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(z).sum(axis=1))
    return float((log_z - z[np.arange(z.shape[0]), targets]).sum())


def _score_in_child(reporter: Any, job: _ChildJob) -> dict[str, Any]:
    """Runs in the llama.cpp child: the file's perplexity under validate's scoring plan."""
    from dsnot_deploy.evaluation.llamacpp_runtime import GGUFModel, ScoringPlan

    reporter.phase("loading", job.path, job.qtype)
    with GGUFModel(Path(job.path), job.ctx, job.threads, gpu_layers=job.gpu_layers) as model:
        reporter.phase("tokenizing with", job.path, job.qtype)
        ids = model.tokenize(job.text)
        bos = model.bos_id if (job.protocol == LLAMACPP and model.adds_bos) else None
        plan = ScoringPlan.for_protocol(job.protocol, job.ctx, bos)
        n_chunks = plan.n_chunks(int(ids.shape[0]), job.max_chunks)
        reporter.send("plan", n_chunks)
        nll: list[float] = []
        seconds = 0.0
        chunks = model.iter_chunks(ids, plan, n_chunks)
        for _ in range(n_chunks):
            reporter.phase("decoding", job.path, job.qtype)
            out = next(chunks)
            nll.append(chunk_nll(out.logits, out.targets))
            seconds += out.seconds
            reporter.send("chunk")
    used = np.ascontiguousarray(ids[: plan.ctx * n_chunks], dtype=np.int64)  # what was fed
    return {"nll": nll, "scored_per_chunk": plan.scored_per_chunk, "n_chunks": n_chunks,
            "n_text_tokens": int(ids.shape[0]), "tokens_sha256": hashlib.sha256(used.tobytes()).hexdigest(),
            "decode_seconds": seconds}


def perplexity(path: Path, label: str, text: str, settings: EvalSettings, progress: Progress = False) -> dict[str, Any]:
    """The llama.cpp perplexity of one GGUF on ``text`` (validate's protocol and chunking), computed in
    a child process (a native crash raises ``LlamaCppCrash``). Returns ``ppl``, ``n_scored``,
    ``per_chunk_ppl``, ``tokens_sha256`` (of the tokens fed) and timings."""
    from converters.gguf_info import read_gguf_info
    from dsnot_deploy.evaluation.llamacpp_child import run_isolated

    info = read_gguf_info(path)
    job = _ChildJob(str(info.path), info.file_type_name, text, settings.protocol, settings.ctx, settings.max_chunks,
                    settings.threads, settings.gpu_layers)
    bar: list[Any] = []

    def receive(message: tuple[Any, ...]) -> None:
        if message[0] == "plan":
            bar.append(open_bar(progress, f"ppl {label}", message[1]))
        elif message[0] == "chunk" and bar:
            bar[0].update(1)

    try:
        res = run_isolated(_score_in_child, job, on_message=receive)
    finally:
        for b in bar:
            b.close()
    n_scored = res["n_chunks"] * res["scored_per_chunk"]
    return {"ppl": math.exp(sum(res["nll"]) / n_scored), "n_scored": n_scored, "n_chunks": res["n_chunks"],
            "per_chunk_ppl": [math.exp(v / res["scored_per_chunk"]) for v in res["nll"]],
            "tokens_sha256": res["tokens_sha256"], "decode_seconds": res["decode_seconds"]}
