#!/usr/bin/env python
"""The pipeline grid (issue 14): every combination of init x refinement x update x allocation that
the default is chosen from, on a real model, resumable across sessions.

A variant is written like `wanda+exact@0.3+admm+owl`: the initial mask (magnitude, wanda, sparsegpt,
or `dense`), then any of `dsnot`, `exact` (`exact@A`: the search judges swaps on (1-A) H + A diag H),
`admm` (weight reconstruction; `admm@modelA`: model correction A), `rounds@R` (R rounds of exact
search and reconstruction), `owl` (layer-wise allocation). Each (variant, pattern) is refined
on the calibration windows and scored, paper protocol, on every `--texts` entry; the held-out
errors are kept too: per layer, the local one (every Linear against its dense weights, on `--heldout`
windows run through the pruned model) and the model-level one (the layer's output hidden state
against the dense model's on the same windows). Each finished row is appended to `--cache` at once, so an interrupted grid continues where
it stopped; `--report` rewrites docs/NAME.{md,json,png} from the cache (scripts/pipeline_report.py).

    python scripts/bench_pipeline.py --variants wanda wanda+admm wanda+admm+owl --patterns 0.5 2:4
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnot_deploy.algorithms.config import (  # noqa: E402
    Allocation,
    AllocationConfig,
    ExactConfig,
    Method,
    PruneConfig,
    ReconstructConfig,
    Refinement,
    SparsityPattern,
    Update,
)
from dsnot_deploy.algorithms.reconstruct import output_error  # noqa: E402
from dsnot_deploy.evaluation.perplexity import perplexity_paper  # noqa: E402
from dsnot_deploy.layerwise.allocate import plan_allocation  # noqa: E402
from dsnot_deploy.layerwise.capture import LayerCall, capture_layer_inputs, to_device  # noqa: E402
from dsnot_deploy.layerwise.driver import (  # noqa: E402
    DriverConfig,
    _calibrate,
    _linears,
    _run_layer,
    run_layers,
)
from dsnot_deploy.sources.models import find_decoder_layers, load_model  # noqa: E402
from dsnot_deploy.sources.textdata import (  # noqa: E402
    load_text_source,
    sample_calibration,
    tokenize_eval,
)

SHARED = ROOT.parent / "shared" / "data"
TEXTS = {
    "wiki-valid": str(SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw"),
    "wiki-test": str(SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"),
    "c4-valid": str(SHARED / "c4" / "en-validation" / "c4-sample.00000-of-00001.json.gz"),
}


def parse_variant(text: str) -> PruneConfig | None:
    """`wanda+exact@0.3+admm+owl` -> its PruneConfig (pattern filled in later); `dense` -> None."""
    head, *rest = text.split("+")
    if head == "dense":
        return None
    # every field the grammar can change is set explicitly, so a change of the library's defaults
    # does not change what a cached row means
    prune = PruneConfig(method=Method(head), refinement=Refinement.NONE, update=Update.NONE,
                        exact=ExactConfig(shrink=0.0), allocation=AllocationConfig(kind=Allocation.UNIFORM),
                        reconstruct=ReconstructConfig(model_correction=0.0))
    for part in rest:
        name, _, value = part.partition("@")
        if name == "dsnot":
            prune = replace(prune, refinement=Refinement.DSNOT)
        elif name == "exact":
            prune = replace(prune, refinement=Refinement.EXACT, exact=ExactConfig(shrink=float(value or 0)))
        elif name == "admm":  # `admm@modelA`: --model-correction A (`admm@model`: A = 1)
            if value and not value.startswith("model"):
                raise SystemExit(f"expected admm or admm@modelA in {text!r}")
            strength = float(value[len("model"):] or 1) if value else 0.0
            prune = replace(prune, update=Update.ADMM,
                            reconstruct=replace(prune.reconstruct, model_correction=strength))
        elif name == "rounds":  # `rounds@R`: R rounds of (exact search, reconstruction)
            if not value.isdigit() or int(value) < 1:
                raise SystemExit(f"expected rounds@R, R >= 1, in {text!r}")
            prune = replace(prune, reconstruct=replace(prune.reconstruct, rounds=int(value)))
        elif name == "owl":
            prune = replace(prune, allocation=AllocationConfig(kind=Allocation.OWL))
        else:
            raise SystemExit(f"unknown variant part {part!r} in {text!r}")
    return prune


def walk_layers(model, layers, windows: torch.Tensor) -> Iterator[tuple[int, Any, torch.Tensor, LayerCall, torch.Tensor]]:
    """Each decoder layer run on `windows`, the model as it stands: (index, layer, its input hidden
    states, its call, its output). The two buffers are reused: copy what must outlive the step."""
    hidden, calls = capture_layer_inputs(model, layers, windows, 1, "cpu", "cpu")
    out = torch.empty_like(hidden)
    for i, layer in enumerate(layers):
        call = LayerCall(args=to_device(calls[i].args, "cpu"), kwargs=to_device(calls[i].kwargs, "cpu"))
        _run_layer(layer, hidden, call, 1, "cpu", out)
        yield i, layer, hidden, call, out
        hidden, out = out, hidden


def layer_outputs(model, layers, windows: torch.Tensor) -> list[torch.Tensor]:
    """Every decoder layer's output hidden states on `windows`, the model as it stands."""
    return [out.clone() for *_, out in walk_layers(model, layers, windows)]


def heldout_layer_errors(model, layers, dense_state: dict[str, torch.Tensor], layers_path: str,
                         windows: torch.Tensor, dense_outputs: list[torch.Tensor]
                         ) -> tuple[list[float], list[float]]:
    """Per decoder layer, two errors on the held-out windows as the (pruned) model feeds them:
    local, the mean over its Linears of sum_i dw_i^T H dw_i / sum_i wd_i^T H wd_i (H from the layer's
    own inputs); and model-level, ||h - h_dense||^2 / ||h_dense||^2 of the layer's output against the
    dense model's output on the same windows (`dense_outputs`), the error perplexity follows."""
    cfg = DriverConfig(prune=PruneConfig(), progress=False)
    errors, model_errors = [], []
    for i, layer, hidden, call, out in walk_layers(model, layers, windows):
        linears = _linears(layer)
        stats = _calibrate(layer, linears, hidden, call, cfg, True)
        rel = []
        for name, mod in linears.items():
            h = stats[name].hessian
            dense = dense_state[f"{layers_path}.{i}.{name}.weight"].float()
            rel.append(output_error(dense, mod.weight.detach().float(), h) / output_error(dense, 0 * dense, h))
        errors.append(sum(rel) / len(rel))
        del stats
        ref = dense_outputs[i].double()
        model_errors.append(float(((out.double() - ref) ** 2).sum() / (ref ** 2).sum()))
    return errors, model_errors


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train" / "c4_sample.jsonl"))
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--texts", nargs="+", default=list(TEXTS), help=f"names among {list(TEXTS)}")
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-chunks", type=int, default=16)
    p.add_argument("--valid-chunks", type=int, default=8, help="chunks of the *-valid texts used for choosing")
    p.add_argument("--heldout", default=TEXTS["c4-valid"], help="text whose first windows give held-out H")
    p.add_argument("--heldout-windows", type=int, default=4)
    p.add_argument("--patterns", nargs="+", default=["0.5", "0.6", "0.7", "2:4"])
    p.add_argument("--variants", nargs="+", default=["dense", "wanda", "sparsegpt", "wanda+dsnot", "sparsegpt+dsnot"])
    p.add_argument("--cache", type=Path, default=None, help="rows file (default docs/NAME.rows.jsonl)")
    p.add_argument("--name", default="bench_pipeline")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    return p.parse_args()


def row_key(args: argparse.Namespace, variant: str, pattern: str) -> str:
    return "|".join(map(str, (args.model, Path(args.calib).name, args.nsamples, args.seqlen, args.eval_seqlen,
                              args.eval_chunks, variant, pattern if variant != "dense" else "-")))


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING)
    cache = args.cache or args.out / f"{args.name}.rows.jsonl"
    done = {json.loads(line)["key"] for line in cache.read_text().splitlines()} if cache.exists() else set()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    layers_path, layers = find_decoder_layers(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    samples = sample_calibration(tok, list(load_text_source(args.calib).documents), args.nsamples, args.seqlen, 0)
    eval_ids = {name: tokenize_eval(tok, load_text_source(TEXTS[name]).eval_text("paper")) for name in args.texts}
    held_ids = tokenize_eval(tok, load_text_source(args.heldout).eval_text("paper"))
    n_held = args.heldout_windows * args.eval_seqlen
    # the held-out windows are taken from the end of the text, away from the scored chunks
    held = held_ids[-n_held:].view(args.heldout_windows, args.eval_seqlen)
    dense_held = layer_outputs(model, layers, held)
    for variant in args.variants:
        base = parse_variant(variant)
        for pattern_text in (args.patterns if base is not None else ["-"]):
            key = row_key(args, variant, pattern_text)
            if key in done:
                continue
            model.load_state_dict(dense_state)
            row = {"key": key, "model": args.model, "variant": variant, "pattern": pattern_text,
                   "calibration": f"{args.nsamples}x{args.seqlen}", "threads": torch.get_num_threads()}
            t0 = time.perf_counter()
            if base is not None:
                pattern = SparsityPattern.parse(pattern_text)
                config = DriverConfig(prune=replace(base, pattern=pattern), progress=False)
                allocation = plan_allocation(model, layers, samples, config)
                result = run_layers(model, layers, samples, replace(config, allocation=allocation))
                row["refine_seconds"] = time.perf_counter() - t0
                linears = [lin for layer in result.layers for lin in layer.linears]
                row["sparsity"] = sum(lin.zeros for lin in linears) / sum(lin.rows * lin.cols for lin in linears)
                row["layer_sparsity"] = [sum(lin.zeros for lin in layer.linears) /
                                         sum(lin.rows * lin.cols for lin in layer.linears) for layer in result.layers]
                row["heldout_layer_error"], row["heldout_model_error"] = heldout_layer_errors(
                    model, layers, dense_state, layers_path, held, dense_held)
            for name, ids in eval_ids.items():
                chunks = args.valid_chunks if name == "wiki-valid" else args.eval_chunks
                row[f"ppl:{name}"] = perplexity_paper(model, ids, args.eval_seqlen, max_chunks=chunks,
                                                      progress=False).ppl
            row["seconds"] = time.perf_counter() - t0
            with cache.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(f"{variant:28s} {pattern_text:4s} " + " ".join(f"{n} {row[f'ppl:{n}']:.2f}" for n in args.texts)
                  + f"  ({row['seconds']:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
