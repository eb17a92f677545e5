"""`dsnot-deploy frontier MODEL OUTDIR`: the size/quality frontier of one model.

The options become a list of points (``frontier.plan``), a template refine job (the shared refine
options), the in-refinement quantization settings and the perplexity protocol (validate's options);
the work is ``dsnot_deploy.frontier.run.run_frontier``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsnot_deploy.cli.common import EXIT_OK, progress_for
from dsnot_deploy.cli.options import (
    add_device_options,
    add_eval_options,
    add_refine_options,
    quantize_overrides,
    refine_job,
)
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.frontier.plan import (
    DEFAULT_DENSE_TYPES,
    DEFAULT_SPARSE_TYPES,
    DEFAULT_SPARSITIES,
)
from dsnot_deploy.sources.aliases import alias_names


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    f = sub.add_parser(
        "frontier", help="size vs llama.cpp perplexity of dense and sparse GGUFs and packs, with Pareto fronts",
        description="Export MODEL dense at several GGUF types, refine it at several sparsities and export each at "
                    "several zero-keeping types (also refined with --quantize TYPE where the type has a lattice), "
                    "pack every file, score every file in llama.cpp on the same tokens and write "
                    "OUTDIR/frontier.json, .md and .png: sizes, perplexity relative to dense F16, and the "
                    "configurations on the GGUF-size and pack-size Pareto fronts. Work files go to OUTDIR/work; "
                    "a rerun measures only the configurations not measured yet.")
    f.add_argument("model", help=f"HF model id, local checkpoint dir, .gguf file, or alias ({alias_names()})")
    f.add_argument("outdir", type=Path, help="folder for frontier.json/.md/.png (and work/)")
    g = f.add_argument_group("configurations")
    g.add_argument("--dense-types", nargs="+", default=list(DEFAULT_DENSE_TYPES), metavar="TYPE",
                   help=f"GGUF types of the dense model; F16 (the reference) is always added "
                        f"(default {' '.join(DEFAULT_DENSE_TYPES)})")
    g.add_argument("--sparsities", nargs="*", default=list(DEFAULT_SPARSITIES), metavar="S",
                   help=f"unstructured sparsities in (0, 1) or N:M patterns (default {' '.join(DEFAULT_SPARSITIES)}; "
                        "none = dense only)")
    g.add_argument("--sparse-types", nargs="+", default=list(DEFAULT_SPARSE_TYPES), metavar="TYPE",
                   help=f"zero-keeping GGUF types of each sparse model (default {' '.join(DEFAULT_SPARSE_TYPES)})")
    g.add_argument("--quantize-types", nargs="+", default=None, metavar="TYPE",
                   help="sparse types also refined with --quantize TYPE (default: every sparse type with a lattice: "
                        "Q8_0, Q5_0, Q4_0)")
    g.add_argument("--no-refine-quantize", action="store_true",
                   help="turn the in-refinement quantization arm off")
    o = f.add_argument_group("files")
    o.add_argument("--pack-levels", default="fast", choices=["fast", "default"],
                   help="zstd levels of the packs: fast = `pack --fast` (default), default = `pack`'s defaults")
    o.add_argument("--keep-files", action="store_true",
                   help="keep every GGUF, pack and checkpoint in OUTDIR/work (default: deleted once measured)")
    o.add_argument("--force", action="store_true", help="measure every configuration again")
    add_refine_options(f)
    add_eval_options(f, comparison=False)
    f.set_defaults(ctx=512, max_chunks=16)
    add_device_options(f)
    return {"frontier": _cmd_frontier}


def _cmd_frontier(args: argparse.Namespace) -> int:
    from converters.llamacpp_loader import check_gpu_layers
    from converters.pack_records import FAST_LEVELS, PackLevels
    from dsnot_deploy.frontier.plan import plan_points
    from dsnot_deploy.frontier.run import EvalSettings, FrontierJob, run_frontier
    from dsnot_deploy.quant.gptq import QuantizeConfig
    from dsnot_deploy.sources.specs import resolve_model_source

    if args.sparsity is not None or args.pattern is not None:
        raise UserInputError("expected --sparsities S [S ...] for the frontier; found --sparsity/--pattern")
    if args.quantize is not None:
        raise UserInputError("expected --quantize-types TYPE [...] (or --no-refine-quantize) for the frontier; "
                             "found --quantize")
    points = plan_points(args.dense_types, args.sparsities, args.sparse_types,
                         [] if args.no_refine_quantize else args.quantize_types)
    if args.outdir.exists() and not args.outdir.is_dir():
        raise UserInputError(f"expected OUTDIR to be a folder, found a file at {args.outdir}")
    evaluation = EvalSettings(text=args.text or "pydoc", split=args.split, protocol=args.protocol, ctx=args.ctx,
                              max_chunks=args.max_chunks, threads=args.threads, gpu_layers=args.gpu_layers)
    check_gpu_layers(args.gpu_layers)
    levels = PackLevels(**FAST_LEVELS) if args.pack_levels == "fast" else PackLevels()
    template = refine_job(args, args.model, args.outdir / "work" / "ckpt", args.nsamples, args.seqlen,
                          scale={"save_state": False})
    quantize = QuantizeConfig(damping=args.quant_damping, shrinks=tuple(args.quant_shrinks),
                              diag_shrink=args.quant_diag_shrink, **quantize_overrides(args))
    job = FrontierJob(model=args.model, outdir=args.outdir, points=points, refine=template, quantize=quantize,
                      eval=evaluation, pack_levels=levels, pack_levels_name=args.pack_levels,
                      force=args.force, keep_files=args.keep_files, progress=progress_for(args))
    from dsnot_deploy.frontier.report import build

    resolve_model_source(args.model)  # a bad MODEL fails before OUTDIR is made
    rows = run_frontier(job)
    doc = build(rows, {"model": args.model})
    print(f"{len(rows)} configurations in {args.outdir}/frontier.json, .md, .png")
    print(doc["sentence"])
    return EXIT_OK
