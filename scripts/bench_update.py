#!/usr/bin/env python
"""Does ADMM weight reconstruction lower perplexity, and at which damping? (issue 14, part 1)

SmolLM2-135M, Wanda init (no mask refinement) at each pattern, calibration C4 train (16 x 512 by
default); `--update none` against `--update admm` at each damping. The damping is chosen on
WikiText-2 *validation* (wiki.valid.raw), and every row is also reported on WikiText-2 *test*:
paper protocol, chunks of `--eval-seqlen`. Writes docs/bench_update.{md,json}. Example:
    python scripts/bench_update.py --patterns 0.5 2:4 --dampings 0.01 0.3
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnot_deploy.algorithms.config import (  # noqa: E402
    Method,
    PruneConfig,
    ReconstructConfig,
    Refinement,
    SparsityPattern,
    Update,
)
from dsnot_deploy.evaluation.perplexity import perplexity_paper  # noqa: E402
from dsnot_deploy.layerwise.driver import DriverConfig, run_layers  # noqa: E402
from dsnot_deploy.sources.models import find_decoder_layers, load_model  # noqa: E402
from dsnot_deploy.sources.textdata import (  # noqa: E402
    load_text_source,
    sample_calibration,
    tokenize_eval,
)

SHARED = ROOT.parent / "shared" / "data"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train" / "c4_sample.jsonl"))
    p.add_argument("--valid", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw"))
    p.add_argument("--test", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--dampings", type=float, nargs="+", default=[0.01, 0.1])
    p.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"])
    p.add_argument("--refinement", default="none", choices=["none", "dsnot", "exact"])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--name", default="bench_update")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    tok = load_model(args.model).tokenizer
    samples = sample_calibration(tok, list(load_text_source(args.calib).documents), args.nsamples, args.seqlen, seed=0)
    texts = {name: tokenize_eval(tok, load_text_source(path).eval_text("paper"))
             for name, path in (("valid", args.valid), ("test", args.test))}
    rows = []
    for pat in args.patterns:
        pattern = SparsityPattern.parse(pat) if ":" in pat else SparsityPattern.unstructured(float(pat))
        variants = [("none", None)] + [("admm", d) for d in args.dampings]
        for update, damping in variants:
            model = load_model(args.model).model
            _, layers = find_decoder_layers(model)
            prune = PruneConfig(method=Method(args.method), pattern=pattern, refinement=Refinement(args.refinement),
                                update=Update(update),
                                reconstruct=ReconstructConfig(damping=damping if damping is not None else 0.01))
            t0 = time.perf_counter()
            res = run_layers(model, layers, samples, DriverConfig(prune=prune, measure_error=True, progress=False))
            seconds = time.perf_counter() - t0
            errors = [lin.output_error_final for layer in res.layers for lin in layer.linears]
            row = {"pattern": pat, "method": args.method, "refinement": args.refinement, "update": update, "damping": damping, "refine_seconds": seconds,
                   "mean_calibration_error": sum(errors) / len(errors)}
            with torch.no_grad():
                for name, ids in texts.items():
                    row[f"ppl_{name}"] = perplexity_paper(model, ids, args.eval_seqlen, max_chunks=args.eval_chunks,
                                                          progress=False).ppl
            rows.append(row)
            print(json.dumps(row))
    write(args, rows)


def write(args: argparse.Namespace, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=2) + "\n")
    lines = [f"# Weight reconstruction (ADMM) after {args.method} + refinement {args.refinement} on SmolLM2-135M "
             "(scripts/bench_update.py)", "",
             f"Calibration {args.nsamples} x {args.seqlen} C4 train tokens; {args.method} mask, refinement "
             f"{args.refinement}; paper "
             f"protocol, {args.eval_chunks} x {args.eval_seqlen} tokens of WikiText-2 validation (where the damping is "
             "chosen) and test (reported). Calibration error: mean relative output error over the Linears.", "",
             "| pattern | update | damping | calibration error | ppl valid | ppl test | refine s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['update']} | {r['damping'] if r['damping'] is not None else '-'} | "
                     f"{r['mean_calibration_error']:.4f} | {r['ppl_valid']:.2f} | {r['ppl_test']:.2f} | "
                     f"{r['refine_seconds']:.0f} |")
    (args.out / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
