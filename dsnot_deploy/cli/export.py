"""`dsnot-deploy export`: a model -> a GGUF file llama.cpp runs (see converters.gguf_export).

MODEL is any spec `refine` accepts: a checkpoint directory (e.g. refine's output) is exported as is;
an alias, a GGUF file or a Hub id is loaded (dequantized, fetched), saved as a temporary checkpoint
next to OUT, exported, and the temporary removed. The GGUF's general.* keys name the source model.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from dsnot_deploy.cli.common import EXIT_OK, add_logging_options, progress_for
from dsnot_deploy.sources.aliases import alias_names


def _type_help() -> str:
    from converters.gguf_types import OUTPUT_TYPES

    return "; ".join(f"{t.name}: {t.description}" for t in OUTPUT_TYPES.values())


def _embedding_types() -> list[str]:
    from converters.gguf_types import EMBEDDING_TYPES

    return list(EMBEDDING_TYPES)


def _zero_keeping() -> list[str]:
    from converters.gguf_types import zero_keeping_names

    return zero_keeping_names()


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser(
        "export", help="write a GGUF file for llama.cpp from a (sparse) checkpoint",
        description="Convert a Hugging Face checkpoint directory (e.g. the output of `refine`) to GGUF, check that "
                    "llama.cpp tokenizes like the HF tokenizer, and count the pruned zeros that survived "
                    "(report: OUT.gguf.export.json). Types that lose zeros are refused for sparse checkpoints "
                    "unless --allow-zero-loss.",
        epilog="types: " + _type_help(),
    )
    p.add_argument("checkpoint", metavar="MODEL",
                   help="checkpoint directory (safetensors + config + tokenizer), alias "
                        f"({alias_names()}), .gguf file or HF model id")
    p.add_argument("out", type=Path, help="output .gguf file (written atomically)")
    p.add_argument("--type", dest="qtype", default="F16", metavar="TYPE",
                   help=f"output type (default F16): {' '.join(_zero_keeping())}, or a llama.cpp mix such as "
                        "Q4_K_M (see the list below)")
    p.add_argument("--imatrix", default="auto",
                   help="importance matrix for llama.cpp-quantized types: auto (the checkpoint's calibration "
                        "statistics when present), none, or a file (llama.cpp imatrix .gguf, or "
                        "calibration_stats.safetensors)")
    p.add_argument("--embedding-type", default=None, type=str.upper, choices=_embedding_types(),
                   help="type of the token embedding (and of an untied output head) when it should differ from "
                        "--type; Q8_0 in a Q4_0 file costs 13.5 MiB on SmolLM2-135M and removed about 40%% of "
                        "Q4_0's perplexity loss there (docs/quantize.md)")
    p.add_argument("--allow-zero-loss", action="store_true",
                   help="allow types that do not keep pruned zeros exactly (Q4_K_M, Q4_1, ...) for a sparse checkpoint")
    p.add_argument("--tokenizer-pre", default=None,
                   help="llama.cpp pre-tokenizer name (default: detected by comparing llama.cpp with the HF tokenizer)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip reading the written tensors back (pruned zeros kept, on-lattice counts, bytes on "
                        "disk); the report's seconds.verify is what it costs, zeros is then null")
    p.add_argument("--threads", type=int, default=0, help="threads for llama.cpp's quantizer (default: all cores)")
    p.add_argument("--force", action="store_true", help="replace OUT if it exists")
    add_logging_options(p)
    return {"export": run_export}


def run_export(args: argparse.Namespace) -> int:
    from converters.gguf_export import ExportConfig, export_gguf, report_path
    from dsnot_deploy.atomic import (
        check_output_file,
        remove_stale_temporaries,
        remove_tree,
        temporary_path,
    )
    from dsnot_deploy.sources.materialize import save_as_checkpoint
    from dsnot_deploy.sources.naming import naming_of
    from dsnot_deploy.sources.specs import resolve_model_source

    out = Path(args.out)
    check_output_file(out, args.force)  # before any loading
    source = resolve_model_source(args.checkpoint)
    config = ExportConfig(qtype=args.qtype, imatrix=args.imatrix, allow_zero_loss=args.allow_zero_loss,
                          force=args.force, progress=progress_for(args), tokenizer_pre=args.tokenizer_pre,
                          threads=args.threads, verify=args.verify,
                          embedding_type=args.embedding_type, naming=tuple(naming_of(source).items()))
    if source.kind == "local-dir":
        report = export_gguf(source.location, out, config)
    else:  # an alias, a GGUF or a Hub id: a temporary checkpoint beside OUT (pid-named, cleaned if killed)
        remove_stale_temporaries(out)
        staging = temporary_path(out, "src")
        try:
            report = export_gguf(save_as_checkpoint(args.checkpoint, staging), out, config)
        finally:
            remove_tree(staging)
    z = report["zeros"]
    types = ", ".join(f"{k} x{v}" for k, v in sorted(report["tensor_types"].items()))
    print(f"wrote {args.out}: {report['type']} ({types}), {report['file_bytes'] / 2**20:.1f} MiB, "
          f"{report['bits_per_weight']:.2f} bits/weight, {report['seconds']['total']:.1f} s")
    zeros = ("pruned zeros not verified (--no-verify)" if z is None else
             f"pruned zeros kept: {z['zeros_kept']} of {z['zeros_in_checkpoint']} ({100 * z['kept_fraction']:.2f}%), "
             f"{z['zeros_added_by_quantization']} new zeros from quantization")
    print(f"{zeros}; tokenizer {report['tokenizer']['model']}"
          f"/{report['tokenizer']['pre']}, {report['tokenizer']['probe_mismatches']} of "
          f"{report['tokenizer']['probe_texts']} probe texts differ from HF; report {report_path(Path(args.out))}")
    return EXIT_OK
