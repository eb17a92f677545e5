"""`dsnot-deploy eval`: perplexity of a model in torch under the paper or llama.cpp protocol."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsnot_deploy.cli.common import EXIT_OK, progress_for
from dsnot_deploy.cli.options import add_device_options
from dsnot_deploy.protocols import PROTOCOLS
from dsnot_deploy.sources.aliases import alias_names


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    e = sub.add_parser("eval", help="perplexity of a model under the paper or llama.cpp protocol",
                       description="Perplexity with the paper protocol (all positions of 2048-token chunks) or "
                                   "llama.cpp's (second half of each chunk, BOS first).")
    e.add_argument("model", help=f"HF model id, local checkpoint dir, .gguf file, or alias ({alias_names()})")
    e.add_argument("--text", default="pydoc", help="wikitext2, c4, a local file, or pydoc (default)")
    e.add_argument("--split", default=None, help="dataset split for wikitext2/c4 (default test/validation)")
    e.add_argument("--protocol", default="paper", choices=list(PROTOCOLS))
    e.add_argument("--seqlen", type=int, default=2048, help="chunk length (n_ctx for llamacpp; default 2048)")
    e.add_argument("--max-chunks", type=int, default=None, help="score at most this many chunks")
    e.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    add_device_options(e)
    return {"eval": _cmd_eval}


def _cmd_eval(args: argparse.Namespace) -> int:
    from dsnot_deploy.evaluation.evaluate import EvalJob, evaluate

    result = evaluate(
        EvalJob(
            model=args.model, text=args.text, split=args.split, protocol=args.protocol, seqlen=args.seqlen,
            max_chunks=args.max_chunks, device=args.device, dtype=args.dtype, progress=progress_for(args),
            json_path=args.json,
        )
    )
    print(
        f"perplexity ({result['protocol']} protocol, {result['n_chunks']} chunks of {result['ctx']}, "
        f"{result['n_scored']} scored tokens): {result['ppl']:.4f}"
    )
    return EXIT_OK
