"""The whole job as one function: refine -> export -> validate (the flagship `refine-and-export`).

Usable from Python as well as from the CLI::

    from dsnot_deploy.pipeline import PipelineConfig, run_pipeline
    result = run_pipeline(PipelineConfig(job=RefineJob(...), out=Path("m.gguf"),
                                         export=ExportConfig(qtype="Q8_0"), validate=ValidateConfig(...)))

The refine job is built once by the caller (its ``outdir`` is replaced by a temporary folder unless
``keep_checkpoint``). The dense side of the validation is the job's model itself, exported to the
same type through the same exporter (a GGUF model is dequantized and re-exported, never compared as
is). Reports are written only after the whole job succeeded; the temporary checkpoint is always
removed.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ReportPaths:
    """Where the validation report goes (each None: not written)."""

    json: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None

    @classmethod
    def beside(cls, out: Path) -> ReportPaths:
        """``OUT.report.json/.md/.png`` next to ``OUT.gguf``."""
        stem = out.name.removesuffix(out.suffix)
        return cls(*(out.with_name(f"{stem}.report.{ext}") for ext in ("json", "md", "png")))

    def all(self) -> list[Path]:
        return [p for p in (self.json, self.markdown, self.plot) if p is not None]


@dataclass(frozen=True)
class PipelineConfig:
    """One refine -> export -> validate run.

    ``job``: the refine job (``dsnot_deploy.layerwise.refine.RefineJob``). ``out``: the sparse GGUF.
    ``export``: ``converters.gguf_export.ExportConfig``. ``validate``: a
    ``dsnot_deploy.evaluation.validate.ValidateConfig`` whose ``dense`` is the model to export as the
    reference (None: stop after the export). ``keep_checkpoint``: keep the checkpoint in
    ``job.outdir`` (else it goes to a temporary folder). ``torch_reference``: add the torch perplexity
    of the sparse checkpoint on the validation tokens. ``cache_dir``: exported dense GGUFs.
    """

    job: Any
    out: Path
    export: Any
    validate: Any | None = None
    keep_checkpoint: bool = False
    torch_reference: bool = True
    reports: ReportPaths = field(default_factory=ReportPaths)
    cache_dir: Path | None = None
    settings: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PipelineResult:
    """What the run produced. ``steps``: (name, one-line summary) in order, for the CLI to print."""

    manifest: dict[str, Any]
    export_report: dict[str, Any]
    checkpoint: Path | None
    steps: tuple[tuple[str, str], ...]
    report: dict[str, Any] | None = None
    checks: tuple[Any, ...] = ()
    seconds: float = 0.0

    @property
    def gate_passed(self) -> bool:
        return all(c.passed for c in self.checks)


def run_pipeline(config: PipelineConfig) -> PipelineResult:
    """Refine, export, validate and write the reports (see the module docstring)."""
    from converters.gguf_export import export_gguf
    from dsnot_deploy.layerwise import refine as refine_module
    from dsnot_deploy.layerwise.manifest import pipeline_name

    t0 = time.perf_counter()
    temporary = None
    steps: list[tuple[str, str]] = []
    try:
        job = config.job
        if not config.keep_checkpoint:
            temporary = Path(tempfile.mkdtemp(prefix="dsnot-refine-and-export-"))
            job = dataclasses.replace(job, outdir=temporary / _checkpoint_name(job.model), save_state=False)
        checkpoint = Path(job.outdir)
        manifest = refine_module.refine(job)
        sp = manifest["sparsity"]
        steps.append(("refine", f"{pipeline_name(manifest)}, sparsity {sp['pruned_linears']:.4f} "
                                f"of pruned Linears, {manifest['times']['end_to_end_seconds']:.0f} s"))
        t_export = time.perf_counter()
        export_report = export_gguf(checkpoint, config.out, config.export)
        steps.append(("export", f"{config.out} ({config.export.qtype}, {config.out.stat().st_size / 2**20:.1f} MiB, "
                                f"{time.perf_counter() - t_export:.0f} s)"))
        kept = checkpoint if config.keep_checkpoint else None
        if config.validate is None:
            return PipelineResult(manifest, export_report, kept, tuple(steps), seconds=time.perf_counter() - t0)
        report, checks = _validate(config, checkpoint, manifest, export_report)
        report["seconds_total"] = time.perf_counter() - t0
        _write_reports(report, config)
        steps.append(("reports", ", ".join(p.name for p in config.reports.all())))
        if kept is not None:
            steps.append(("checkpoint", str(kept)))
        return PipelineResult(manifest, export_report, kept, tuple(steps), report, tuple(checks),
                              time.perf_counter() - t0)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _checkpoint_name(model: str) -> str:
    """A folder name for the temporary checkpoint that names the model (the exporter's fallback
    ``general.name`` when the checkpoint's config carries none)."""
    name = Path(str(model).rstrip("/")).name.removesuffix(".gguf") or "model"
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def _validate(config: PipelineConfig, checkpoint: Path, manifest: dict[str, Any],
              export_report: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    from dsnot_deploy.evaluation.dense_cache import dense_gguf_for
    from dsnot_deploy.evaluation.report import build_report, settings_of
    from dsnot_deploy.evaluation.validate import run_validation

    qtype = config.export.qtype
    model = str(config.validate.dense)
    dense_path, _ = dense_gguf_for(model, qtype, config.cache_dir, progress=config.validate.progress,
                                   gguf_as_is=False)
    validate = dataclasses.replace(config.validate, dense=str(dense_path),
                                   checkpoint=checkpoint if config.torch_reference else None)
    result, context = run_validation(validate)
    context["dense_origin"] = {"kind": "exported", "model": model, "gguf": str(dense_path), "qtype": qtype}
    checks = validate.gate.check(result)
    settings = {**settings_of(validate), **config.settings}
    extra = {"refine": {"manifest_sparsity": manifest["sparsity"], "method": manifest["method"],
                        "refinement": manifest["refinement"], "times": manifest["times"],
                        "checkpoint": str(checkpoint) if config.keep_checkpoint else None},
             "export": _export_summary(export_report)}
    return build_report(result, context, settings, checks, extra), checks


def _write_reports(report: dict[str, Any], config: PipelineConfig) -> None:
    from dsnot_deploy.evaluation.report import write_all

    paths = config.reports
    write_all(report, paths.json, paths.markdown, paths.plot, config.export.force)


def _export_summary(report: Any) -> Any:
    if not isinstance(report, dict):
        return report
    return {k: v for k, v in report.items() if not (isinstance(v, (list, dict)) and len(v) > 64)}
