#!/usr/bin/env python
"""Does the exact refinement's lower calibration error carry over to held-out inputs?

Runs the dense SmolLM2-135M on 2 x N C4 calibration windows, collects H for some Linears of some
layers on each half separately, prunes with Wanda, refines with the exact variant using the first
half's H only (optionally shrunk toward its diagonal), and prints the remaining output error,
relative to Wanda's, on the first half (train) and on the second half (held out).

    python scripts/bench_exact_heldout.py --nsamples 16 --seqlen 512 --layers 2,10
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnot_deploy.algorithms.config import ExactConfig, PruneConfig, SparsityPattern  # noqa: E402
from dsnot_deploy.algorithms.exact import exact_refine, row_errors  # noqa: E402
from dsnot_deploy.algorithms.masks import wanda_mask  # noqa: E402
from dsnot_deploy.layerwise.capture import capture_layer_inputs  # noqa: E402
from dsnot_deploy.layerwise.driver import DriverConfig, _calibrate, _linears, _run_layer  # noqa: E402
from dsnot_deploy.sources.models import find_decoder_layers, load_model  # noqa: E402
from dsnot_deploy.sources.textdata import load_text_source, sample_calibration  # noqa: E402

LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calib", default=str(ROOT.parent / "shared/data/c4/en-train/c4_sample.jsonl"))
    p.add_argument("--nsamples", type=int, default=16, help="windows per half")
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--layers", default="2,10")
    p.add_argument("--patterns", default="0.5,0.6,2:4")
    p.add_argument("--shrink", default="0,0.2,0.4", help="H <- (1-a) H + a diag(H), for each a")
    args = p.parse_args()
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    _, layers = find_decoder_layers(model)
    docs = list(load_text_source(args.calib).documents)
    samples = sample_calibration(tok, docs, 2 * args.nsamples, args.seqlen, seed=0)
    hidden, calls = capture_layer_inputs(model, layers, samples, 1, "cpu", "cpu")
    out = torch.empty_like(hidden)
    wanted = [int(i) for i in args.layers.split(",")]
    mats = {}
    cfg = DriverConfig(prune=PruneConfig(), progress=False)
    for i in range(max(wanted) + 1):
        if i in wanted:
            lin = _linears(layers[i])
            train = _calibrate(layers[i], lin, hidden[: args.nsamples], calls[i], cfg, True)
            held = _calibrate(layers[i], lin, hidden[args.nsamples :], calls[i], cfg, True)
            for name in LINEARS:
                mats[f"{i}.{name}"] = (lin[name].weight.detach().float().clone(), train[name].hessian.clone(),
                                       train[name].sqnorm.clone(), held[name].hessian.clone())
        _run_layer(layers[i], hidden, calls[i], 1, "cpu", out)
        hidden, out = out, hidden
    print(f"{2 * args.nsamples} x {args.seqlen} C4 windows, halves of {args.nsamples}; layers {wanted}")
    for pattern_text in args.patterns.split(","):
        pattern = SparsityPattern.parse(pattern_text)
        for shrink in (float(a) for a in args.shrink.split(",")):
            train_rel, held_rel = [], []
            for w, h, sq, h_held in mats.values():
                mask = wanda_mask(w, sq, pattern)
                start = w * mask
                h_fit = (1 - shrink) * h + shrink * torch.diag(torch.diagonal(h))
                res = exact_refine(w, start, mask, h_fit, pattern, ExactConfig())
                train_rel.append(float(row_errors(w, res.weight, h).sum() / row_errors(w, start, h).sum()))
                held_rel.append(float(row_errors(w, res.weight, h_held).sum() / row_errors(w, start, h_held).sum()))
            print(f"{pattern_text:4s} shrink {shrink:.1f}: error / Wanda's  train {sum(train_rel) / len(train_rel):.3f}"
                  f"  held-out {sum(held_rel) / len(held_rel):.3f}  (per Linear held-out: "
                  + " ".join(f"{x:.3f}" for x in held_rel) + ")", flush=True)


if __name__ == "__main__":
    main()
