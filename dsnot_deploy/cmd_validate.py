"""The `validate` and `refine-and-export` commands.

`validate` runs a sparse GGUF and its dense model in llama.cpp on identical tokens and turns the
comparison into an exit code: 0 when every given threshold holds, 1 when one fails, 2 for bad input.
`refine-and-export` joins refine -> export -> validate into one command.
Heavy imports (torch, llama_cpp, the exporter) happen inside the handlers.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from .cli_common import EXIT_FAIL, EXIT_OK, add_logging_options
from .errors import UserInputError

log = logging.getLogger(__name__)

# The embedded default of `refine-and-export` with no MODEL: offline model and text, and a reduced
# size so the whole job takes about 10 minutes on 2 CPU cores (refine 16 x 512 with the exact
# refinement about 2-3 min; each GGUF export well under a minute; validation 2 x 8 x 512 tokens at
# about 225 tokens/s in llama.cpp is 40 s; the torch reference of the same tokens about 40 s).
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "pydoc"
DEFAULT_REDUCED = {"nsamples": 16, "seqlen": 512, "ctx": 512, "max_chunks": 8}
# With a MODEL given: the paper's calibration size and llama-perplexity's usual context.
FULL = {"nsamples": 128, "seqlen": 2048, "ctx": 2048, "max_chunks": None}


def _add_eval_options(p: argparse.ArgumentParser, reduced_note: bool = False) -> None:
    g = p.add_argument_group("evaluation (llama.cpp)")
    g.add_argument("--text", default=None,
                   help="evaluation text: wikitext2, c4, a .txt/.raw/.jsonl/.json.gz file, or pydoc (default)")
    g.add_argument("--split", default=None, help="dataset split for wikitext2/c4 (default test/validation)")
    g.add_argument("--protocol", default="llamacpp", choices=["llamacpp", "paper"],
                   help="llamacpp = llama-perplexity's (second half of each chunk scored, BOS first; default), "
                        "paper = every position of each chunk")
    note = " (default 2048; 512 with no MODEL)" if reduced_note else " (default 2048)"
    g.add_argument("--ctx", type=int, default=None, help="tokens per chunk, n_ctx" + note)
    note = " (default all; 8 with no MODEL)" if reduced_note else " (default all)"
    g.add_argument("--max-chunks", type=int, default=None, help="score at most this many chunks" + note)
    g.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs)")
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where dense models exported to GGUF are cached (default $XDG_CACHE_HOME/dsnot-deploy/gguf)")
    gate = p.add_argument_group("gate (exit 1 when one fails)")
    gate.add_argument("--max-ppl-ratio", type=float, default=None, help="sparse ppl / dense ppl must be <= R")
    gate.add_argument("--max-ppl-increase", type=float, default=None,
                      help="sparse ppl - dense ppl (perplexity points) must be <= D")
    gate.add_argument("--max-kld", type=float, default=None, help="mean KL(dense || sparse) in nats must be <= K")
    gate.add_argument("--min-top1", type=float, default=None,
                      help="top-1 agreement, a fraction in [0, 1] (0.9 = 90%%), must be >= A")


def _gate(args: argparse.Namespace):
    from .validate import GateConfig

    return GateConfig(max_ppl_ratio=args.max_ppl_ratio, max_ppl_increase=args.max_ppl_increase,
                      max_kld=args.max_kld, min_top1=args.min_top1)


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    v = sub.add_parser(
        "validate", help="measure a sparse GGUF against its dense model in llama.cpp and gate on the result",
        description="Run SPARSE.gguf and the dense model in llama.cpp on identical tokens: perplexity of both, "
                    "their ratio, mean KL divergence of the next-token distributions, top-1 agreement, per "
                    "chunk; exit 0 when every threshold holds, 1 when one fails, 2 for bad input.")
    v.add_argument("sparse", type=Path, help="the sparse GGUF file")
    v.add_argument("--dense", required=True,
                   help="a dense GGUF, or a model (checkpoint dir, alias smollm2-135m, HF id) exported here to "
                        "a GGUF of SPARSE's type and cached by content hash")
    v.add_argument("--checkpoint", type=Path, default=None,
                   help="the sparse HF checkpoint: adds its torch perplexity on the same tokens for reference")
    _add_eval_options(v)
    out = v.add_argument_group("reports")
    out.add_argument("--json", type=Path, default=None, help="write the full report as JSON here")
    out.add_argument("--markdown", type=Path, default=None, help="write a Markdown summary here")
    out.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    out.add_argument("--force", action="store_true", help="replace existing report files")
    add_logging_options(v)

    r = sub.add_parser(
        "refine-and-export", help="refine, export to GGUF and validate against the dense model, in one go",
        description="Prune and refine MODEL, export the sparse checkpoint to OUT.gguf, export MODEL itself at "
                    "the same type, compare both in llama.cpp and write OUT.report.json/.md/.png. With no "
                    f"MODEL: the embedded default {DEFAULT_MODEL} on offline text ({DEFAULT_TEXT}) with a "
                    f"reduced size (calibration {DEFAULT_REDUCED['nsamples']} x {DEFAULT_REDUCED['seqlen']} "
                    f"tokens, evaluation {DEFAULT_REDUCED['max_chunks']} chunks of {DEFAULT_REDUCED['ctx']}) "
                    "that finishes in about 10 minutes on 2 CPU cores. Returns the gate's exit code.")
    r.add_argument("model", nargs="?", default=None,
                   help=f"HF model id, local checkpoint dir, .gguf file, or alias (default {DEFAULT_MODEL})")
    r.add_argument("out", type=Path, help="the sparse GGUF to write (reports go beside it: OUT.report.*)")
    r.add_argument("--type", default="F16", help="GGUF type of both sides (F16, Q8_0, Q4_0, ...; default F16)")
    r.add_argument("--keep-checkpoint", type=Path, default=None, metavar="DIR",
                   help="write the sparse HF checkpoint here (default: a temporary folder, removed at the end)")
    r.add_argument("--no-validate", action="store_true", help="stop after the export")
    r.add_argument("--no-torch-reference", action="store_true",
                   help="skip the torch perplexity of the sparse checkpoint on the validation tokens")
    r.add_argument("--allow-zero-loss", action="store_true",
                   help="export even when the type loses pruned zeros (e.g. Q4_1, Q4_K)")
    r.add_argument("--force", action="store_true", help="replace OUT.gguf, its reports and --keep-checkpoint DIR")
    from .cli import (  # lazily: cli imports this module while building its parser
        _add_refine_options,
        add_scale_options,
    )

    _add_refine_options(r)
    add_scale_options(r, "DIR")
    r.set_defaults(nsamples=None, seqlen=None)  # filled in by _cmd_refine_and_export (reduced with no MODEL)
    r.add_argument("--device", default="cpu", help="where layers are refined: cpu, cuda, cuda:1 (default cpu)")
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype while refining (default float32)")
    _add_eval_options(r, reduced_note=True)
    add_logging_options(r)
    return {"validate": _cmd_validate, "refine-and-export": _cmd_refine_and_export}


# --------------------------------------------------------------------------- validate


def _cmd_validate(args: argparse.Namespace) -> int:
    from .report import build_report, check_outputs, write_all
    from .validate import ValidateConfig, run_validation

    check_outputs([args.json, args.markdown, args.plot], args.force)
    config = ValidateConfig(
        sparse=args.sparse, dense=args.dense, text=args.text or "pydoc", split=args.split, protocol=args.protocol,
        ctx=args.ctx or 2048, max_chunks=args.max_chunks, gate=_gate(args), checkpoint=args.checkpoint,
        threads=args.threads, cache_dir=args.cache_dir, progress=not args.quiet,
    )
    result, context = run_validation(config)
    checks = config.gate.check(result)
    report = build_report(result, context, _settings(config), checks)
    write_all(report, args.json, args.markdown, args.plot, args.force)
    print_summary(report)
    return _gate_exit(checks)


def _settings(config: Any) -> dict[str, Any]:
    out = asdict(config)
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}


def _gate_exit(checks: list[Any]) -> int:
    failed = [c for c in checks if not c.passed]
    for c in checks:
        print(c.message())
    if failed:
        print(f"gate FAILED: {len(failed)} of {len(checks)} threshold(s): "
              + "; ".join(f"{c.option} by {abs(c.margin):.6g}" for c in failed))
        return EXIT_FAIL
    if checks:
        print(f"gate passed: {len(checks)} threshold(s)")
    return EXIT_OK


def print_summary(report: dict[str, Any], steps: list[tuple[str, str]] | None = None) -> None:
    """The summary table printed at the end of both commands."""
    r = report["results"]
    rows: list[tuple[str, str]] = list(steps or [])
    rows += [
        ("protocol", f"llama.cpp {r['protocol']}: {r['n_chunks']} x {r['ctx']} tokens, {r['dense']['n_scored']} scored"),
        ("type", str(report["models"]["export_type"])),
        ("perplexity dense", f"{r['dense']['ppl']:.4f}"),
        ("perplexity sparse", f"{r['sparse']['ppl']:.4f}"),
        ("ratio / increase", f"{r['ppl_ratio']:.4f} / {r['ppl_increase']:+.4f}"),
        ("mean KLD", f"{r['kld_mean']:.5f} (p99 {r['kld_quantiles']['p99']:.5f})"),
        ("top-1 agreement", f"{100 * r['top1']:.2f}%"),
        ("tokens/s", f"{r['tokens_per_second']:.1f} (decode: dense {r['dense']['tokens_per_second']:.1f}, "
                     f"sparse {r['sparse']['tokens_per_second']:.1f})"),
    ]
    if r.get("torch"):
        rows.append(("torch ppl (sparse)", f"{r['torch']['ppl']:.4f} (llama.cpp {100 * r['torch']['relative_difference']:+.3f}%)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


# --------------------------------------------------------------------------- refine-and-export


def _cmd_refine_and_export(args: argparse.Namespace) -> int:
    from .cli import _prune_config
    from .refine import CalibrationConfig, RefineJob, check_output_dir, refine
    from .report import build_report, check_outputs, write_all
    from .validate import ValidateConfig, dense_gguf_for, run_validation

    t0 = time.perf_counter()
    embedded = args.model is None
    sizes = DEFAULT_REDUCED if embedded else FULL
    model = DEFAULT_MODEL if embedded else args.model
    nsamples = args.nsamples if args.nsamples is not None else sizes["nsamples"]
    seqlen = args.seqlen if args.seqlen is not None else sizes["seqlen"]
    ctx = args.ctx if args.ctx is not None else sizes["ctx"]
    max_chunks = args.max_chunks if args.max_chunks is not None else sizes["max_chunks"]
    text = args.text or DEFAULT_TEXT
    out = Path(args.out)
    if out.suffix.lower() != ".gguf":
        raise UserInputError(f"expected OUT to end in .gguf, found {str(out)!r}")
    reports = {k: out.with_name(out.name.removesuffix(out.suffix) + f".report.{k}") for k in ("json", "md", "png")}
    check_outputs([out], args.force)
    if not args.no_validate:
        check_outputs(list(reports.values()), args.force)
    if args.keep_checkpoint is not None:
        check_output_dir(args.keep_checkpoint, args.force)
    gate = _gate(args)
    prune = _prune_config(args)
    scale = _scale_options(args)
    if embedded:
        print(f"no MODEL given: using the embedded default {model} with offline text; reduced size: calibration "
              f"{nsamples} x {seqlen} tokens of {args.calib}, evaluation {max_chunks} chunks of {ctx} tokens "
              f"of {text} (about 10 minutes on 2 CPU cores)")
    if not args.no_validate:  # validate's own checks before the long work
        ValidateConfig(sparse=out, dense=model, text=text, split=args.split, protocol=args.protocol, ctx=ctx,
                       max_chunks=max_chunks, gate=gate, threads=args.threads)
    from converters.gguf_export import ExportConfig, export_gguf

    export_config = ExportConfig(qtype=args.type, allow_zero_loss=args.allow_zero_loss, force=args.force,
                                 progress=not args.quiet)
    _check_type_keeps_zeros(args.type, args.allow_zero_loss)
    temporary = None
    steps: list[tuple[str, str]] = []
    try:
        if args.keep_checkpoint is not None:
            checkpoint = Path(args.keep_checkpoint)
        else:
            temporary = Path(tempfile.mkdtemp(prefix="dsnot-refine-and-export-"))
            checkpoint = temporary / "sparse"
        manifest = refine(RefineJob(
            model=model, outdir=checkpoint, prune=prune,
            calibration=CalibrationConfig(args.calib, nsamples, seqlen, args.seed), dtype=args.dtype,
            device=args.device, batch_size=args.batch_size, offload_activations=args.offload_activations,
            measure_error=args.measure_error, force=args.force, progress=not args.quiet, **scale,
        ))
        sp = manifest["sparsity"]
        steps.append(("refine", f"{manifest['method']}+{manifest['refinement']}, sparsity {sp['pruned_linears']:.4f} of "
                                f"pruned Linears, {manifest['times']['end_to_end_seconds']:.0f} s"))
        t_export = time.perf_counter()
        export_report = export_gguf(checkpoint, out, export_config)
        steps.append(("export", f"{out} ({args.type}, {out.stat().st_size / 2**20:.1f} MiB, "
                                f"{time.perf_counter() - t_export:.0f} s)"))
        if args.no_validate:
            print("\n".join(f"{k:<8}  {v}" for k, v in steps))
            print(f"done in {time.perf_counter() - t0:.0f} s (not validated: --no-validate)")
            return EXIT_OK
        # the dense side is MODEL itself through the same path as the sparse one (a GGUF MODEL is
        # dequantized and re-exported at --type, never compared as is)
        dense_path, _ = dense_gguf_for(model, args.type, args.cache_dir, progress=not args.quiet, gguf_as_is=False)
        config = ValidateConfig(
            sparse=out, dense=str(dense_path), text=text, split=args.split, protocol=args.protocol, ctx=ctx,
            max_chunks=max_chunks, gate=gate, checkpoint=None if args.no_torch_reference else checkpoint,
            threads=args.threads, cache_dir=args.cache_dir, progress=not args.quiet,
        )
        result, context = run_validation(config)
        context["dense_origin"] = {"kind": "exported", "model": model, "gguf": str(dense_path), "qtype": args.type}
        checks = gate.check(result)
        settings = {**_settings(config), "model": model, "embedded_default": embedded, "type": args.type,
                    "calibration": {"source": args.calib, "nsamples": nsamples, "seqlen": seqlen, "seed": args.seed}}
        extra = {"refine": {"manifest_sparsity": manifest["sparsity"], "method": manifest["method"],
                            "refinement": manifest["refinement"], "times": manifest["times"],
                            "checkpoint": str(checkpoint) if args.keep_checkpoint is not None else None},
                 "export": _export_summary(export_report)}
        report = build_report(result, context, settings, checks, extra)
        report["seconds_total"] = time.perf_counter() - t0
        write_all(report, reports["json"], reports["md"], reports["png"], args.force)
        steps.append(("reports", ", ".join(str(p.name) for p in reports.values())))
        if args.keep_checkpoint is not None:
            steps.append(("checkpoint", str(checkpoint)))
        print_summary(report, steps)
        print(f"done in {time.perf_counter() - t0:.0f} s")
        return _gate_exit(checks)
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _check_type_keeps_zeros(qtype: str, allow_zero_loss: bool) -> None:
    """The refined checkpoint is always sparse: refuse a type that loses zeros before refining,
    rather than after (the exporter would refuse it then)."""
    from converters.gguf_types import parse_output_type

    otype = parse_output_type(qtype)
    if not otype.keeps_zeros and not allow_zero_loss:
        raise UserInputError(f"expected a --type that keeps pruned zeros, found {otype.name} ({otype.description}); "
                             "choose e.g. F16, Q8_0, Q5_0, Q4_0 or pass --allow-zero-loss")


def _scale_options(args: argparse.Namespace) -> dict[str, Any]:
    """RefineJob's scale and reliability options from the shared command-line options.

    --resume needs --keep-checkpoint DIR (the state lives beside DIR); without DIR the checkpoint is
    temporary, so no per-layer state is saved."""
    from .cli import scale_job_options

    if args.resume and args.keep_checkpoint is None:
        raise UserInputError("expected --keep-checkpoint DIR with --resume (the state of the interrupted run lives "
                             "beside DIR); found no --keep-checkpoint")
    options = scale_job_options(args)
    options["save_state"] = args.save_state and args.keep_checkpoint is not None
    return options


def _export_summary(report: Any) -> Any:
    if not isinstance(report, dict):
        return report
    return {k: v for k, v in report.items() if not (isinstance(v, (list, dict)) and len(v) > 64)}
