"""Reports of a validation: JSON (every number, versions, file hashes, settings), Markdown, PNG.

All three are written atomically (``dsnot_deploy.atomic``). The PNG is drawn with matplotlib's
Agg backend: perplexity per chunk of the dense and the sparse model, and, when the sparse GGUF
carries ``dsnot.sparsity.per_layer``, the sparsity of each decoder layer.
"""

from __future__ import annotations

import io
import json
import logging
import math
import platform
import sys
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from dsnot_deploy import __version__
from dsnot_deploy.atomic import atomic_write_bytes
from dsnot_deploy.errors import UserInputError

logger = logging.getLogger(__name__)

REPORT_FORMAT = "dsnot-deploy/validate-report/1"


def check_outputs(paths: list[Path | None], force: bool) -> None:
    """Fail before any work when an output exists (without ``force``) or its folder is missing."""
    for path in paths:
        if path is None:
            continue
        path = Path(path)
        if path.exists() and not force:
            raise UserInputError(f"output {path} already exists; pass --force to replace it")
        if not path.absolute().parent.is_dir():
            raise UserInputError(f"expected the output folder {path.absolute().parent} to exist, found none")


def versions() -> dict[str, str | None]:
    """Versions of Python, this package and the libraries whose numbers the report holds."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version(), "dsnot_deploy": __version__}
    for dist in ("llama-cpp-python", "gguf", "numpy", "torch", "transformers"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def _finite(value: Any) -> Any:
    """JSON has no NaN/inf: write them as strings so the file stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def settings_of(config: Any) -> dict[str, Any]:
    """A config dataclass as report settings: paths as strings, a progress callback as a flag."""
    from dataclasses import fields

    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        if f.name == "progress":
            value = bool(value)
        elif isinstance(value, Path):
            value = str(value)
        elif is_dataclass(value):
            value = asdict(value)
        out[f.name] = value
    return out


def build_report(result: Any, context: dict[str, Any], settings: dict[str, Any], checks: list[Any],
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The report as a JSON-ready dict.

    ``result``: a ``ValidationResult``; ``context``: what ``run_validation`` returned beside it;
    ``settings``: the options of the run; ``checks``: the ``GateCheck`` list; ``extra``: more
    sections (e.g. the refine and export steps of ``refine-and-export``).
    """
    from dsnot_deploy.evaluation.dense_cache import sha256_file

    sparse_info, dense_info = context["sparse_info"], context["dense_info"]
    files = {
        "sparse_gguf": {"path": str(sparse_info.path), "sha256": sha256_file(sparse_info.path),
                        "bytes": sparse_info.size_bytes},
        "dense_gguf": {"path": str(dense_info.path), "sha256": sha256_file(dense_info.path),
                       "bytes": dense_info.size_bytes},
    }
    text_path = Path(str(settings.get("text", "")))
    if text_path.is_file():
        files["text"] = {"path": str(text_path), "sha256": sha256_file(text_path), "bytes": text_path.stat().st_size}
    report = {
        "format": REPORT_FORMAT,
        "gate": {"passed": all(c.passed for c in checks), "checks": [c.as_dict() for c in checks]},
        "results": asdict(result),
        "settings": settings,
        "text": {"source": context["text_name"], "characters": context["text_chars"]},
        "models": {
            "sparse": _gguf_summary(sparse_info),
            "dense": {**_gguf_summary(dense_info), "origin": context["dense_origin"]},
            "export_type": context["qtype"],
        },
        "files": files,
        "versions": versions(),
        "llamacpp_runtime": context.get("runtime"),
        "seconds_total": context["seconds_total"],
    }
    if extra:
        report.update(extra)
    return _finite(report)


def _gguf_summary(info: Any) -> dict[str, Any]:
    return {
        "architecture": info.architecture,
        "file_type": info.file_type,
        "file_type_name": info.file_type_name,
        "tensor_types": info.tensor_types,
        "block_count": info.block_count,
        "n_tokens_vocab": len(info.tokens),
        "dsnot": info.dsnot_metadata(),
    }


def write_json(report: dict[str, Any], path: Path, force: bool = True) -> None:
    atomic_write_bytes(Path(path), (json.dumps(report, indent=2) + "\n").encode(), force=force)


def markdown(report: dict[str, Any]) -> str:
    """A short human summary of the report."""
    r = report["results"]
    d, s = r["dense"], r["sparse"]
    sparse_meta = report["models"]["sparse"]["dsnot"]
    lines = [
        f"# Validation of {Path(s['path']).name}",
        "",
        f"llama.cpp, {r['protocol']} protocol: {r['n_chunks']} chunks of {r['ctx']} tokens "
        f"({r['scored_per_chunk']} scored per chunk, {d['n_scored']} in all) of `{report['text']['source']}`; "
        f"type {report['models']['export_type']}.",
        "",
    ]
    if sparse_meta:
        what = ", ".join(f"{k.removeprefix('dsnot.')}={_fmt(v)}" for k, v in sparse_meta.items()
                         if k != "dsnot.sparsity.per_layer")
        lines += [f"Sparse model: {what}.", ""]
    lines += [
        "| | dense | sparse |",
        "|---|---|---|",
        f"| perplexity | {d['ppl']:.4f} | {s['ppl']:.4f} |",
        f"| decode tokens/s | {d['tokens_per_second']:.1f} | {s['tokens_per_second']:.1f} |",
        f"| file | {Path(d['path']).name} | {Path(s['path']).name} |",
        "",
        f"- perplexity ratio (sparse/dense): **{r['ppl_ratio']:.4f}** (increase {r['ppl_increase']:+.4f})",
        f"- mean KL(dense || sparse): **{r['kld_mean']:.5f}** nats (median {r['kld_quantiles']['median']:.5f}, "
        f"p99 {r['kld_quantiles']['p99']:.5f}, max {r['kld_quantiles']['max']:.5f})",
        f"- top-1 agreement: **{100 * r['top1']:.2f}%**",
        f"- throughput: {r['tokens_per_second']:.1f} tokens/s over both models, metrics included "
        f"({r['metric_seconds']:.1f} s of {r['loop_seconds']:.1f} s spent on metrics)",
    ]
    if r.get("torch"):
        t = r["torch"]
        lines.append(f"- torch perplexity of the sparse checkpoint on the same tokens: {t['ppl']:.4f} "
                     f"(llama.cpp/torch - 1 = {100 * t['relative_difference']:+.3f}%)")
    gate = report["gate"]
    lines += ["", "## Gate", ""]
    if not gate["checks"]:
        lines.append("No thresholds given.")
    for c in gate["checks"]:
        verdict = "pass" if c["passed"] else "**FAIL**"
        lines.append(f"- {verdict}: {c['name']} {c['value']:.6g} {c['comparison']} {c['threshold']:.6g} "
                     f"(`{c['option']}`, margin {c['margin']:+.6g})")
    lines += ["", "## Per chunk", "", "| chunk | dense ppl | sparse ppl | mean KLD | top-1 |", "|---|---|---|---|---|"]
    for i, (pd, ps, k, t1) in enumerate(zip(d["per_chunk_ppl"], s["per_chunk_ppl"], r["kld_per_chunk"],
                                            r["top1_per_chunk"])):
        lines.append(f"| {i} | {pd:.4f} | {ps:.4f} | {k:.5f} | {100 * t1:.2f}% |")
    v = report["versions"]
    lines += ["", f"dsnot-deploy {v['dsnot_deploy']}, llama-cpp-python {v['llama-cpp-python']}, gguf {v['gguf']}; "
              f"sha256 sparse {report['files']['sparse_gguf']['sha256'][:16]}..., "
              f"dense {report['files']['dense_gguf']['sha256'][:16]}...", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_markdown(report: dict[str, Any], path: Path, force: bool = True) -> None:
    atomic_write_bytes(Path(path), markdown(report).encode(), force=force)


def plot_png(report: dict[str, Any]) -> bytes:
    """The PNG: per-chunk perplexity (dense vs sparse); per-layer sparsity when the GGUF carries it."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import (
        Figure,  # a bare Figure never touches pyplot's global state
    )
    from matplotlib.ticker import MaxNLocator

    r = report["results"]
    per_layer = report["models"]["sparse"]["dsnot"].get("dsnot.sparsity.per_layer")
    panels = 2 if per_layer else 1
    fig = Figure(figsize=(6.5 * panels, 4.2), dpi=110)
    ax = fig.add_subplot(1, panels, 1)
    chunks = list(range(len(r["dense"]["per_chunk_ppl"])))
    ax.plot(chunks, r["dense"]["per_chunk_ppl"], "o-", label=f"dense ({r['dense']['ppl']:.3f})")
    ax.plot(chunks, r["sparse"]["per_chunk_ppl"], "s-", label=f"sparse ({r['sparse']['ppl']:.3f})")
    ax.set_xlabel("chunk")
    ax.set_ylabel("perplexity")
    ax.set_title(f"llama.cpp {r['protocol']} protocol, ctx {r['ctx']}; KLD {r['kld_mean']:.4f}, "
                 f"top-1 {100 * r['top1']:.1f}%", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend()
    if per_layer:
        values = per_layer if isinstance(per_layer, list) else [per_layer]
        ax2 = fig.add_subplot(1, panels, 2)
        ax2.bar(range(len(values)), values, color="tab:orange")
        target = report["models"]["sparse"]["dsnot"].get("dsnot.sparsity")
        if isinstance(target, (int, float)):
            ax2.axhline(float(target), color="k", ls="--", lw=1, label=f"target {float(target):.3g}")
            ax2.legend()
        ax2.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax2.set_xlabel("decoder layer")
        ax2.set_ylabel("sparsity of pruned Linears")
        allocation = report["models"]["sparse"]["dsnot"].get("dsnot.allocation", "uniform")
        ax2.set_title(f"sparsity per layer (from the GGUF; allocation {allocation})", fontsize=9)
        ax2.set_ylim(0, 1)
        ax2.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plot(report: dict[str, Any], path: Path, force: bool = True) -> None:
    atomic_write_bytes(Path(path), plot_png(report), force=force)


def write_all(report: dict[str, Any], json_path: Path | None, markdown_path: Path | None, plot_path: Path | None,
              force: bool) -> list[Path]:
    """Write the requested outputs; return the paths written."""
    written = []
    if json_path is not None:
        write_json(report, json_path, force)
        written.append(Path(json_path))
    if markdown_path is not None:
        write_markdown(report, markdown_path, force)
        written.append(Path(markdown_path))
    if plot_path is not None:
        write_plot(report, plot_path, force)
        written.append(Path(plot_path))
    for path in written:
        logger.info("wrote %s", path)
    return written
