"""`dsnot-deploy refine-and-export`: refine -> export -> validate in one command.

The options become one RefineJob, one ExportConfig and one ValidateConfig; the job itself is
``dsnot_deploy.pipeline.run_pipeline``. With no MODEL it runs the embedded default (offline model
and text, reduced sizes). Returns the gate's exit code.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsnot_deploy.cli.common import EXIT_OK, add_logging_options, progress_for
from dsnot_deploy.cli.options import (
    add_eval_options,
    add_refine_options,
    add_scale_options,
    gate_config,
    refine_job,
    scale_job_options,
)
from dsnot_deploy.cli.validate import gate_exit, print_summary
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.sources.aliases import alias_names

# types refine-and-export quantizes inside refinement unless --no-quantize: where the sweep beat both
# round-to-nearest and llama.cpp's importance-matrix quantizer on held-out text (docs/quantize.md); on
# SPARSE_Q4 it was within noise of llama.cpp's (-1.1% .. +0.3%), so the presets stay opt-in (--quantize)
QUANTIZE_BY_DEFAULT = ("Q4_0", "Q5_0")

# The embedded default of `refine-and-export` with no MODEL: offline model and text, and a reduced
# size that keeps the whole job short on 2 CPU cores (EMBEDDED_TIME_NOTE: measured as the README says).
DEFAULT_MODEL = "smollm2-135m"
DEFAULT_TEXT = "pydoc"
DEFAULT_REDUCED = {"nsamples": 16, "seqlen": 512, "ctx": 512, "max_chunks": 8}
# With a MODEL given: the paper's calibration size and llama-perplexity's usual context.
FULL = {"nsamples": 128, "seqlen": 2048, "ctx": 2048, "max_chunks": None}
# measured as the README says (fresh clone, 2 CPU cores, 2026-12-02): 210 s wall, refine 135 s
EMBEDDED_TIME_NOTE = "about 4 minutes on 2 CPU cores, measured"


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    r = sub.add_parser(
        "refine-and-export", help="refine, export to GGUF and validate against the dense model, in one go",
        description="Prune and refine MODEL, export the sparse checkpoint to OUT.gguf, export MODEL itself at "
                    "the same type, compare both in llama.cpp and write OUT.report.json/.md/.png. With no "
                    f"MODEL: the embedded default {DEFAULT_MODEL} on offline text ({DEFAULT_TEXT}) with a "
                    f"reduced size (calibration {DEFAULT_REDUCED['nsamples']} x {DEFAULT_REDUCED['seqlen']} "
                    f"tokens, evaluation {DEFAULT_REDUCED['max_chunks']} chunks of {DEFAULT_REDUCED['ctx']}) "
                    f"({EMBEDDED_TIME_NOTE}). Returns the gate's exit code.")
    r.add_argument("model", nargs="?", default=None,
                   help=f"HF model id, local checkpoint dir, .gguf file, or alias ({alias_names()}; "
                        f"default {DEFAULT_MODEL})")
    r.add_argument("out", type=Path, help="the sparse GGUF to write (reports go beside it: OUT.report.*)")
    r.add_argument("--type", default="F16", help="GGUF type of both sides (F16, Q8_0, Q4_0, ...; default F16)")
    r.add_argument("--keep-checkpoint", type=Path, default=None, metavar="DIR",
                   help="write the sparse HF checkpoint here (default: a temporary folder, removed at the end)")
    r.add_argument("--no-validate", action="store_true", help="stop after the export")
    r.add_argument("--no-torch-reference", action="store_true",
                   help="skip the torch perplexity of the sparse checkpoint on the validation tokens")
    r.add_argument("--allow-zero-loss", action="store_true",
                   help="export even when the type loses pruned zeros (e.g. Q4_1, Q4_K)")
    r.add_argument("--no-quantize", action="store_true",
                   help=f"for --type {', '.join(QUANTIZE_BY_DEFAULT)}: do not place the weights on the type's "
                        "lattice inside refinement (it does so by default, `--quantize TYPE`, as measured in "
                        "docs/quantize.md); export then rounds to nearest")
    r.add_argument("--force", action="store_true", help="replace OUT.gguf, its reports and --keep-checkpoint DIR")
    add_refine_options(r)
    add_scale_options(r, "DIR")
    r.set_defaults(nsamples=None, seqlen=None)  # filled in by _cmd_refine_and_export (reduced with no MODEL)
    r.add_argument("--device", default="cpu", help="where layers are refined: cpu, cuda, cuda:1 (default cpu)")
    r.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype while refining (default float32)")
    add_eval_options(r, reduced_note=True)
    add_logging_options(r)
    return {"refine-and-export": _cmd_refine_and_export}


def _cmd_refine_and_export(args: argparse.Namespace) -> int:
    from converters.gguf_export import ExportConfig
    from dsnot_deploy.evaluation.report import check_outputs
    from dsnot_deploy.evaluation.validate import ValidateConfig
    from dsnot_deploy.layerwise.refine import (
        check_output_dir,
    )
    from dsnot_deploy.pipeline import PipelineConfig, ReportPaths, run_pipeline

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
    reports = ReportPaths.beside(out)
    check_outputs([out], args.force)
    if not args.no_validate:
        check_outputs(reports.all(), args.force)
    if args.keep_checkpoint is not None:
        check_output_dir(args.keep_checkpoint, args.force)
    scale = _scale_options(args)
    if embedded:
        print(f"no MODEL given: using the embedded default {model} with offline text; reduced size: calibration "
              f"{nsamples} x {seqlen} tokens of {args.calib}, evaluation {max_chunks} chunks of {ctx} tokens "
              f"of {text} ({EMBEDDED_TIME_NOTE})")
    validate = None
    if not args.no_validate:  # validate's own checks before the long work
        validate = ValidateConfig(sparse=out, dense=model, text=text, split=args.split, protocol=args.protocol,
                                  ctx=ctx, max_chunks=max_chunks, gate=gate_config(args), threads=args.threads,
                                  cache_dir=args.cache_dir, progress=progress_for(args), gpu_layers=args.gpu_layers)
    _check_type_keeps_zeros(args.type, args.allow_zero_loss)
    quantized = _default_quantize(args)
    job = refine_job(args, model, args.keep_checkpoint or Path("sparse"), nsamples, seqlen, scale)
    config = PipelineConfig(
        job=job, out=out,
        export=ExportConfig(qtype=args.type, allow_zero_loss=args.allow_zero_loss, force=args.force,
                            progress=progress_for(args)),
        validate=validate, keep_checkpoint=args.keep_checkpoint is not None,
        torch_reference=not args.no_torch_reference, reports=reports, cache_dir=args.cache_dir,
        settings={"model": model, "embedded_default": embedded, "type": args.type, "quantize": quantized,
                  "calibration": {"source": args.calib, "nsamples": nsamples, "seqlen": seqlen, "seed": args.seed}},
    )
    result = run_pipeline(config)
    if result.report is None:
        print("\n".join(f"{k:<8}  {v}" for k, v in result.steps))
        print(f"done in {result.seconds:.0f} s (not validated: --no-validate)")
        return EXIT_OK
    print_summary(result.report, list(result.steps))
    print(f"done in {result.seconds:.0f} s")
    return gate_exit(list(result.checks))


def _default_quantize(args: argparse.Namespace) -> str | None:
    """Set ``args.quantize`` to ``--type`` where in-refinement quantization is the default; return the type
    quantized to (None: none)."""
    qtype = str(args.type).strip().upper()
    if args.quantize is None and not args.no_quantize and qtype in QUANTIZE_BY_DEFAULT:
        if args.dtype != "float32":
            print(f"note: --type {qtype} with --dtype {args.dtype}: no in-refinement quantization "
                  f"(it needs float32); export rounds to nearest")
        else:
            args.quantize = qtype
    return args.quantize


def _check_type_keeps_zeros(qtype: str, allow_zero_loss: bool) -> None:
    """The refined checkpoint is always sparse: refuse a type that loses zeros before refining,
    rather than after (the exporter would refuse it then)."""
    from converters.gguf_types import parse_output_type, zero_keeping_names

    try:
        otype = parse_output_type(qtype)
    except KeyError as exc:
        raise UserInputError(str(exc.args[0])) from None
    if not otype.keeps_zeros and not allow_zero_loss:
        raise UserInputError(f"expected a --type that keeps pruned zeros, found {otype.name} ({otype.description}); "
                             f"choose one of {', '.join(zero_keeping_names())} or pass --allow-zero-loss")


def _scale_options(args: argparse.Namespace) -> dict[str, Any]:
    """RefineJob's scale and reliability options from the shared command-line options.

    --resume needs --keep-checkpoint DIR (the state lives beside DIR); without DIR the checkpoint is
    temporary, so no per-layer state is saved."""
    if args.resume and args.keep_checkpoint is None:
        raise UserInputError("expected --keep-checkpoint DIR with --resume (the state of the interrupted run lives "
                             "beside DIR); found no --keep-checkpoint")
    options = scale_job_options(args)
    options["save_state"] = args.save_state and args.keep_checkpoint is not None
    return options
