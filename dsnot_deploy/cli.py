"""Command-line interface: the only place that parses strings and sets up logging.

Exit codes: 0 success, 2 bad input (one clear line, no traceback unless --debug),
1 internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import __version__
from .cli_common import (
    EXIT_BAD_INPUT,
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    EXIT_OK,
    Parser,
    add_logging_options,
)
from .errors import DsnotError

log = logging.getLogger("dsnot_deploy")

# Commands defined in their own modules: each has `register(subparsers) -> {name: handler}`.
COMMAND_MODULES = (
    "dsnot_deploy.cmd_export",
    "dsnot_deploy.cmd_validate",
    "dsnot_deploy.cmd_pack",
)


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where layers are processed: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype; statistics are always float32 (default float32)")
    add_logging_options(p)


def _add_refine_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="initial mask (default wanda)")
    pat = g.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in (0, 1) (default 0.5)")
    pat.add_argument("--pattern", default=None, help="N:M pattern, N zeros in every M columns, e.g. 2:4")
    g.add_argument("--magnitude-scope", default="per-row", choices=["per-row", "per-matrix"],
                   help="magnitude ranking group (paper baseline: per-matrix; DSnoT init: per-row)")
    r = p.add_argument_group("refinement")
    ref = r.add_mutually_exclusive_group()
    ref.add_argument("--refine", default="exact", choices=["exact", "dsnot", "none"],
                     help="mask refinement: exact = prune-and-grow judged by the exact calibration output "
                          "error (default; measured best, see docs/bench_refine.md), dsnot = the faithful "
                          "DSnoT of the paper, none = the initial mask alone")
    ref.add_argument("--dsnot", dest="refine", action="store_const", const="dsnot", help="same as --refine dsnot")
    ref.add_argument("--no-dsnot", dest="refine", action="store_const", const="none", help="same as --refine none")
    r.add_argument("--max-cycle-time", type=int, default=50, help="DSnoT: swaps per row at most (default 50)")
    r.add_argument("--update-threshold", type=float, default=0.1, help="DSnoT: stop a row at |error| <= this (0.1)")
    r.add_argument("--pow-of-var-regrowing", type=float, default=1.0, help="DSnoT: grow key c/var^p (default 1)")
    sign = r.add_mutually_exclusive_group()
    sign.add_argument("--same-sign", dest="same_sign", action="store_true", default=None,
                      help="DSnoT: stop a row when its error would change sign (default: on for N:M only)")
    sign.add_argument("--no-same-sign", dest="same_sign", action="store_false")
    r.add_argument("--variance", default="within-sample", choices=["within-sample", "pooled"],
                   help="DSnoT: channel variance (within-sample = reference parity)")
    r.add_argument("--skip-refine", action="append", default=[], choices=["attn", "mlp"],
                   help="prune but do not refine this group of Linears (repeatable; reference: mlp)")
    r.add_argument("--exact-max-swaps", type=int, default=128, help="exact: swaps per row at most (default 128)")
    r.add_argument("--exact-top-k", type=int, default=8, help="exact: candidates per side per swap (default 8)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="pydoc",
                   help="calibration text: c4, wikitext2 (via datasets), a .txt/.raw/.jsonl/.json.gz file, "
                        "or pydoc (offline text shipped with Python; default)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--batch-size", type=int, default=1, help="sequences per layer forward; divides nsamples")
    c.add_argument("--offload-activations", action="store_true", help="keep layer activations on the CPU")
    c.add_argument("--measure-error", action="store_true",
                   help="also collect H to report the true output error of every method (costs time)")


def add_scale_options(p: argparse.ArgumentParser, outdir: str) -> argparse._ArgumentGroup:
    """--stream, --device-map, --offload-dir, --resume, --no-save-state, --deterministic and
    --no-memory-check (shared by refine and refine-and-export); returns the "scale" group.
    `outdir` names the checkpoint folder in the help text."""
    scale = p.add_argument_group("scale (docs/scale.md)")
    scale.add_argument("--stream", action="store_true",
                       help="read, refine and write one decoder layer at a time from the safetensors shards "
                            "(memory-mapped): memory does not grow with depth; needs a safetensors checkpoint")
    scale.add_argument("--device-map", default=None, metavar="MAP",
                       help="keep the whole model resident over several devices, placed by accelerate: auto, "
                            "balanced, balanced_low_0, sequential, or a JSON file {module: device}; each layer "
                            "is refined on its own device")
    scale.add_argument("--offload-dir", type=Path, default=None, metavar="DIR",
                       help="keep the activation buffers in memory-mapped files in DIR (disk offload)")
    rel = p.add_argument_group("interruption and resources (docs/reliability.md)")
    rel.add_argument("--resume", action="store_true",
                     help=f"continue an interrupted run from its last finished layer (state saved per layer in "
                          f".{outdir}.resume next to {outdir}); refused if any setting differs; same result as an "
                          "uninterrupted run")
    rel.add_argument("--no-save-state", dest="save_state", action="store_false",
                     help="do not save the per-layer resume state (saves one extra copy of the weights on disk)")
    rel.add_argument("--deterministic", action="store_true",
                     help="CUDA: deterministic kernels only (torch.use_deterministic_algorithms, fixed cuBLAS "
                          "workspace, no TF32), for identical bits run to run; the CPU is deterministic anyway")
    rel.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                     help="skip the check that the estimated memory (activations, statistics, one layer) fits in "
                          "what is available before calibration")
    return scale


def scale_job_options(args: argparse.Namespace) -> dict[str, Any]:
    """RefineJob's fields for the options `add_scale_options` adds."""
    return {"stream": args.stream, "activations_dir": args.offload_dir, "device_map": _device_map_arg(args.device_map),
            "resume": args.resume, "save_state": args.save_state, "memory_check": args.memory_check,
            "deterministic": args.deterministic}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dsnot-deploy", description="Make a decoder LLM sparse without training and ship it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("refine", help="prune a model layer by layer and save a sparse checkpoint",
                       description="Prune every Linear of the decoder layers (magnitude/Wanda/SparseGPT), "
                                   "refine the masks (exact or DSnoT), save a HF checkpoint + sparsity.json.")
    p.add_argument("model", help="HF model id, local checkpoint dir, .gguf file, or alias smollm2-135m")
    p.add_argument("outdir", type=Path, help="output checkpoint directory (created atomically)")
    p.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    _add_refine_options(p)
    scale = add_scale_options(p, "OUTDIR")
    scale.add_argument("--dry-run", action="store_true",
                       help="print the memory needed per device and the expected time (from the config and "
                            "rates measured here), then stop without reading weights or writing anything")
    _add_common(p)

    e = sub.add_parser("eval", help="perplexity of a model under the paper or llama.cpp protocol",
                       description="Perplexity with the paper protocol (all positions of 2048-token chunks) or "
                                   "llama.cpp's (second half of each chunk, BOS first).")
    e.add_argument("model", help="HF model id, local checkpoint dir, .gguf file, or alias smollm2-135m")
    e.add_argument("--text", default="pydoc", help="wikitext2, c4, a local file, or pydoc (default)")
    e.add_argument("--split", default=None, help="dataset split for wikitext2/c4 (default test/validation)")
    e.add_argument("--protocol", default="paper", choices=["paper", "llamacpp"])
    e.add_argument("--seqlen", type=int, default=2048, help="chunk length (n_ctx for llamacpp; default 2048)")
    e.add_argument("--max-chunks", type=int, default=None, help="score at most this many chunks")
    e.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    _add_common(e)
    for module_name in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module_name).register(sub))
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "datasets", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


def _prune_config(args: argparse.Namespace):
    from .config import (
        DSnoTConfig,
        ExactConfig,
        MagnitudeScope,
        Method,
        PruneConfig,
        Refinement,
        SparsityPattern,
        VarianceKind,
    )

    if args.pattern is not None:
        pattern = SparsityPattern.parse(args.pattern)
    else:
        pattern = SparsityPattern.unstructured(0.5 if args.sparsity is None else args.sparsity)
    return PruneConfig(
        method=Method(args.method),
        pattern=pattern,
        refinement=Refinement(args.refine),
        magnitude_scope=MagnitudeScope(args.magnitude_scope),
        dsnot=DSnoTConfig(
            max_cycle_time=args.max_cycle_time,
            update_threshold=args.update_threshold,
            pow_of_var_regrowing=args.pow_of_var_regrowing,
            same_sign=args.same_sign,
            variance=VarianceKind(args.variance),
        ),
        exact=ExactConfig(max_swaps=args.exact_max_swaps, top_k=args.exact_top_k),
        skip_refine_groups=tuple(args.skip_refine),
    )


def _device_map_arg(text: str | None):
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    import json

    from .errors import UserInputError

    try:
        value = json.loads(Path(text).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"expected --device-map auto/balanced/balanced_low_0/sequential or a JSON file "
                             f"{{module: device}}; found {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"expected a JSON object {{module: device}} in {text}; found {type(value).__name__}")
    return value


def _cmd_refine(args: argparse.Namespace) -> int:
    from .refine import CalibrationConfig, RefineJob, refine

    if args.dry_run:
        return _cmd_refine_dry_run(args)
    job = RefineJob(
        model=args.model,
        outdir=args.outdir,
        prune=_prune_config(args),
        calibration=CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed),
        dtype=args.dtype,
        device=args.device,
        batch_size=args.batch_size,
        offload_activations=args.offload_activations,
        measure_error=args.measure_error,
        force=args.force,
        progress=not args.quiet,
        **scale_job_options(args),
    )
    manifest = refine(job)
    s = manifest["sparsity"]
    print(
        f"wrote {args.outdir}: {manifest['method']}+{manifest['refinement']}, "
        f"sparsity {s['pruned_linears']:.4f} of pruned Linears ({s['all_parameters']:.4f} of all parameters), "
        f"mask time {manifest['times']['mask_seconds']:.1f} s, "
        f"end-to-end {manifest['times']['end_to_end_seconds']:.1f} s"
    )
    if manifest.get("error"):
        err = manifest["error"]
        print(
            f"calibration output error (relative, mean over Linears): {err['mean_relative_output_error_init']:.5f}"
            f" -> {err['mean_relative_output_error_final']:.5f}"
        )
    return EXIT_OK


def _cmd_refine_dry_run(args: argparse.Namespace) -> int:
    from .estimate import RunShape, estimate_for_spec, format_estimate
    from .refine import CalibrationConfig, RefineJob

    device_map = _device_map_arg(args.device_map)
    # the same validation as a real run (batch size, dtype, CUDA present, stream vs device map)
    RefineJob(model=args.model, outdir=args.outdir, prune=_prune_config(args),
              calibration=CalibrationConfig(args.calib, args.nsamples, args.seqlen, args.seed), dtype=args.dtype,
              device=args.device, batch_size=args.batch_size, stream=args.stream, activations_dir=args.offload_dir,
              device_map=device_map)
    n_devices = 1
    if device_map is not None:
        import torch

        n_devices = (len({str(v) for v in device_map.values()}) if isinstance(device_map, dict)
                     else max(torch.cuda.device_count(), 1))
    activations = "disk" if args.offload_dir is not None else "cpu" if args.offload_activations else "device"
    run = RunShape(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dtype=args.dtype,
                   device=args.device, stream=args.stream, activations=activations, n_devices=n_devices,
                   measure_error=args.measure_error)
    print(format_estimate(estimate_for_spec(args.model, run, _prune_config(args))))
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate import EvalJob, evaluate

    result = evaluate(
        EvalJob(
            model=args.model, text=args.text, split=args.split, protocol=args.protocol, seqlen=args.seqlen,
            max_chunks=args.max_chunks, device=args.device, dtype=args.dtype, progress=not args.quiet,
            json_path=args.json,
        )
    )
    print(
        f"perplexity ({result['protocol']} protocol, {result['n_chunks']} chunks of {result['ctx']}, "
        f"{result['n_scored']} scored tokens): {result['ppl']:.4f}"
    )
    return EXIT_OK


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"refine": _cmd_refine, "eval": _cmd_eval}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except DsnotError as exc:
        if args.debug:
            log.exception("failed")
        print(f"dsnot-deploy {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_BAD_INPUT))
    except KeyboardInterrupt:
        print(f"dsnot-deploy {args.command}: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # last resort: one line unless --debug
        if args.debug:
            raise
        print(f"dsnot-deploy {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
