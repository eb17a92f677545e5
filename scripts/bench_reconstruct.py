#!/usr/bin/env python
"""ADMM weight reconstruction on real SmolLM2-135M layers (issue 14, part 1): which schedule.

For the Linears of a few decoder layers: H from the dense model's inputs on C4 train windows
(calibration) and on C4 validation windows (held out); a Wanda mask (50% unstructured or 2:4); then
the reconstructed weights of each ADMM schedule against the exact per-row least-squares solution of
the same damped objective. Printed per schedule, summed over the Linears: calibration output error
relative to Wanda's and to the exact solution's, held-out output error relative to Wanda's, seconds.

The schedule is an optimiser setting, chosen on how close it gets to the exact minimiser of the
calibration objective per second. The damping changes the objective (a ridge toward the dense
weights); it is chosen on the held-out error.
Writes docs/bench_reconstruct.{md,json}. Example: python scripts/bench_reconstruct.py --layers 0 15 29
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

from dsnot_deploy.algorithms.config import SparsityPattern  # noqa: E402
from dsnot_deploy.algorithms.masks import wanda_mask  # noqa: E402
from dsnot_deploy.algorithms.reconstruct import (  # noqa: E402
    ReconstructConfig,
    admm_reconstruct,
    least_squares_reconstruct,
    output_error,
)
from dsnot_deploy.sources.models import find_decoder_layers, load_model  # noqa: E402
from dsnot_deploy.sources.textdata import load_text_source, sample_calibration  # noqa: E402

SHARED = ROOT.parent / "shared" / "data"
SCHEDULES = {
    "40 x rho 0.1, x1.3 (prototype)": ReconstructConfig(iterations=40, rho=0.1, growth=1.3),
    "40 x rho 0.3, constant": ReconstructConfig(iterations=40, rho=0.3, growth=1.0),
    "40 x rho 1.0, constant": ReconstructConfig(iterations=40, rho=1.0, growth=1.0),
    "40 x rho 0.05, x1.1": ReconstructConfig(iterations=40, rho=0.05, growth=1.1),
    "80 x rho 0.05, x1.05": ReconstructConfig(iterations=80, rho=0.05, growth=1.05),
    "80 x rho 0.3, constant": ReconstructConfig(iterations=80, rho=0.3, growth=1.0),
    # damping (lambda / mean diag H) regularises the fit to the calibration tokens
    "40 x rho 0.05, x1.1, damping 0.03": ReconstructConfig(iterations=40, rho=0.05, growth=1.1, damping=0.03),
    "40 x rho 0.05, x1.1, damping 0.1": ReconstructConfig(iterations=40, rho=0.05, growth=1.1, damping=0.1),
    "40 x rho 0.05, x1.1, damping 0.3": ReconstructConfig(iterations=40, rho=0.05, growth=1.1, damping=0.3),
    "40 x rho 0.05, x1.1, damping 1.0": ReconstructConfig(iterations=40, rho=0.05, growth=1.1, damping=1.0),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train" / "c4_sample.jsonl"))
    p.add_argument("--heldout", default=str(SHARED / "c4" / "en-validation" / "c4-sample.00000-of-00001.json.gz"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 15, 29])
    p.add_argument("--patterns", nargs="+", default=["0.5", "2:4"])
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    return p.parse_args()


def hessians(model, layers_path, layers, tokens: torch.Tensor, wanted: list[int]) -> dict[str, torch.Tensor]:
    """(1/B) sum X^T X of every Linear input in the wanted layers, float64, dense model."""
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for i in wanted:
        for name, mod in layers[i].named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{i}.{name}"

                def hook(m, inputs, _out, key=key):
                    x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).double()
                    sums[key] = sums.get(key, 0) + x.T @ x

                hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for row in tokens:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {k: v / tokens.shape[0] for k, v in sums.items()}


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    layers_path, layers = find_decoder_layers(model)
    calib = sample_calibration(tok, load_text_source(args.calib).documents, args.nsamples, args.seqlen, seed=0)
    held = sample_calibration(tok, load_text_source(args.heldout).documents, args.nsamples // 2, args.seqlen, seed=1)
    h_cal = hessians(model, layers_path, layers, calib, args.layers)
    h_held = hessians(model, layers_path, layers, held, args.layers)
    modules = {f"{i}.{n}": m for i in args.layers for n, m in layers[i].named_modules()
               if isinstance(m, torch.nn.Linear)}
    results = {}
    for pat in args.patterns:
        pattern = SparsityPattern.parse(pat) if ":" in pat else SparsityPattern.unstructured(float(pat))
        rows = {name: {"cal": 0.0, "held": 0.0, "seconds": 0.0} for name in ["wanda", "exact", *SCHEDULES]}
        for key, mod in modules.items():
            wd = mod.weight.detach().double()
            hc, hh = h_cal[key], h_held[key]
            mask = wanda_mask(wd.float(), hc.diagonal().float(), pattern).bool()
            start = wd * mask
            t0 = time.perf_counter()
            exact = least_squares_reconstruct(wd, mask, hc)
            t_exact = time.perf_counter() - t0
            for name, w, sec in (("wanda", start, 0.0), ("exact", exact, t_exact)):
                rows[name]["cal"] += output_error(wd, w, hc)
                rows[name]["held"] += output_error(wd, w, hh)
                rows[name]["seconds"] += sec
            for name, cfg in SCHEDULES.items():
                t0 = time.perf_counter()
                z = admm_reconstruct(wd.float(), start.float(), mask, hc.float(), cfg)
                rows[name]["seconds"] += time.perf_counter() - t0
                rows[name]["cal"] += output_error(wd, z.double(), hc)
                rows[name]["held"] += output_error(wd, z.double(), hh)
        results[pat] = rows
        print(f"pattern {pat}")
        for name, r in rows.items():
            print(f"  {name:34s} cal/wanda {r['cal'] / rows['wanda']['cal']:.4f}  cal/exact {r['cal'] / rows['exact']['cal']:.4f}"
                  f"  held/wanda {r['held'] / rows['wanda']['held']:.4f}  {r['seconds']:.2f} s")
    write(args, results)


def write(args: argparse.Namespace, results: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_reconstruct.json").write_text(json.dumps(
        {"settings": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2) + "\n")
    lines = ["# ADMM reconstruction schedules on SmolLM2-135M layers (scripts/bench_reconstruct.py)", "",
             f"Layers {args.layers} (every Linear), Wanda mask, H from {args.nsamples} x {args.seqlen} C4 train tokens "
             f"(calibration) and {args.nsamples // 2} x {args.seqlen} C4 validation tokens (held out). Output errors "
             "summed over the Linears; float32 ADMM, float64 exact per-row least squares of the same damped objective.",
             ""]
    for pat, rows in results.items():
        lines += [f"## {pat}", "", "| weights | calibration error / Wanda | / exact | held-out error / Wanda | seconds |",
                  "|---|---|---|---|---|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['cal'] / rows['wanda']['cal']:.4f} | {r['cal'] / rows['exact']['cal']:.4f} | "
                         f"{r['held'] / rows['wanda']['held']:.4f} | {r['seconds']:.2f} |")
        lines.append("")
    (args.out / "bench_reconstruct.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
