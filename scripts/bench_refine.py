#!/usr/bin/env python
"""Refinement benchmark on SmolLM2-135M (issue 2): perplexity, sparsity, times, memory.

Grid: dense; magnitude / Wanda / SparseGPT, each alone, with faithful DSnoT and with the exact
variant, at 50/60/70% unstructured and 2:4.  Calibration: C4 train sample from ../shared/data
(or `--calib c4` through datasets); evaluation: WikiText-2 test, paper protocol.
Every grid run collects H so that the true calibration output error is known for every method;
separate timing runs (no H unless the method needs it) give the time ratios.

Writes docs/bench_refine.{md,json,png} and prints the ratios.  Example:
    python scripts/bench_refine.py --nsamples 32 --seqlen 512 --eval-seqlen 1024 --eval-chunks 16
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnot_deploy.algorithms.config import (  # noqa: E402
    DSnoTConfig,
    Method,
    PruneConfig,
    Refinement,
    SparsityPattern,
    VarianceKind,
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
log = logging.getLogger("bench_refine")


class PeakRSS:
    """Peak resident set size of this process during a `with` block (polled every 20 ms)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._rss())

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train" / "c4_sample.jsonl"))
    p.add_argument("--eval-text", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"))
    p.add_argument("--nsamples", type=int, default=16)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-seqlen", type=int, default=1024)
    p.add_argument("--eval-chunks", type=int, default=8)
    p.add_argument("--patterns", default="0.5,0.6,0.7,2:4")
    p.add_argument("--methods", default="magnitude,wanda,sparsegpt")
    p.add_argument("--refinements", default="none,dsnot,exact")
    p.add_argument("--timing-only", action="store_true", help="only the timing runs (no grid, no plot)")
    p.add_argument("--timing-patterns", default="0.6,2:4", help="patterns of the timing runs ('' for none)")
    p.add_argument("--variance-patterns", default="0.6,2:4",
                   help="patterns where Wanda+DSnoT also runs with pooled variance ('' for none)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--name", default="bench_refine")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.manual_seed(0)
    t_all = time.perf_counter()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    _, layers = find_decoder_layers(model)
    dense_state = {k: v.clone() for k, v in model.state_dict().items()}
    calib = load_text_source(args.calib)
    samples = sample_calibration(tok, list(calib.documents), args.nsamples, args.seqlen, seed=0)
    eval_ids = tokenize_eval(tok, load_text_source(args.eval_text).eval_text("paper"))
    settings = {
        "model": args.model, "calibration": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
        "eval_text": args.eval_text, "eval_protocol": "paper", "eval_seqlen": args.eval_seqlen,
        "eval_chunks": args.eval_chunks, "eval_tokens_available": int(eval_ids.numel()),
        "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    print("settings:", json.dumps(settings), flush=True)

    def evaluate() -> float:
        return perplexity_paper(model, eval_ids, args.eval_seqlen, max_chunks=args.eval_chunks, progress=False).ppl

    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    dense_ppl = evaluate()
    rows.append({"method": "dense", "refinement": "none", "pattern": "dense", "ppl": dense_ppl})
    print(f"dense ppl {dense_ppl:.3f}", flush=True)

    def run(method: str, refinement: str, pattern_text: str, measure_error: bool,
            variance: VarianceKind = VarianceKind.WITHIN_SAMPLE) -> dict:
        model.load_state_dict(dense_state)
        pattern = SparsityPattern.parse(pattern_text)
        prune = PruneConfig(method=Method(method), pattern=pattern, refinement=Refinement(refinement),
                            dsnot=DSnoTConfig(variance=variance))
        t0 = time.perf_counter()
        with PeakRSS() as rss:
            res = run_layers(model, layers, samples,
                             DriverConfig(prune=prune, measure_error=measure_error, progress=False))
        seconds = time.perf_counter() - t0
        lins = [lin for layer in res.layers for lin in layer.linears]
        zeros = sum(lin.zeros for lin in lins)
        size = sum(lin.rows * lin.cols for lin in lins)
        row = {
            "method": method, "refinement": refinement, "pattern": pattern_text, "variance": variance.value,
            "achieved_sparsity": zeros / size, "mask_seconds": res.mask_seconds, "end_to_end_seconds": seconds,
            "peak_rss_bytes": rss.peak, "swaps_mean": sum(lin.swaps_mean * lin.rows for lin in lins)
            / sum(lin.rows for lin in lins),
        }
        if measure_error:
            row["layer_output_error"] = [
                sum(lin.output_error_final for lin in layer.linears) / len(layer.linears) for layer in res.layers
            ]
            row["layer_output_error_init"] = [
                sum(lin.output_error_init for lin in layer.linears) / len(layer.linears) for layer in res.layers
            ]
            row["linears_worsened"] = sum(lin.output_error_final > lin.output_error_init * (1 + 1e-9) for lin in lins)
            row["linears"] = len(lins)
        return row

    timing: list[dict] = []  # first, while the machine is quietest
    for pattern in filter(None, args.timing_patterns.split(",")):
        for refinement in ("none", "dsnot", "exact"):
            row = run("wanda", refinement, pattern, measure_error=False)
            timing.append(row)
            print(f"timing wanda {refinement:5s} {pattern:4s} mask {row['mask_seconds']:.2f}s "
                  f"e2e {row['end_to_end_seconds']:.1f}s", flush=True)

    if args.timing_only:
        print("\n".join(ratio_lines({"grid": [], "timing": timing})))
        timing_report = {"settings": settings, "timing": timing}
        (args.out / f"{args.name}.timing.json").write_text(json.dumps(timing_report, indent=1))
        return
    patterns = args.patterns.split(",")
    for pattern in patterns:
        for method in args.methods.split(","):
            for refinement in args.refinements.split(","):
                row = run(method, refinement, pattern, measure_error=True)
                row["ppl"] = evaluate()
                rows.append(row)
                (args.out / f"{args.name}.partial.json").write_text(json.dumps({"grid": rows, "timing": timing}))
                print(f"{method:9s} {refinement:5s} {pattern:4s} ppl {row['ppl']:10.3f} "
                      f"sparsity {row['achieved_sparsity']:.4f} mask {row['mask_seconds']:7.1f}s "
                      f"e2e {row['end_to_end_seconds']:7.1f}s swaps {row['swaps_mean']:.1f} "
                      f"worse-linears {row.get('linears_worsened')}/{row.get('linears')}", flush=True)

    variance_rows: list[dict] = []
    for pattern in filter(None, args.variance_patterns.split(",")):
        row = run("wanda", "dsnot", pattern, measure_error=True, variance=VarianceKind.POOLED)
        row["ppl"] = evaluate()
        variance_rows.append(row)
        print(f"wanda dsnot pooled-variance {pattern:4s} ppl {row['ppl']:10.3f}", flush=True)

    report = {"settings": settings, "grid": rows, "timing": timing, "variance": variance_rows,
              "total_seconds": time.perf_counter() - t_all}
    (args.out / f"{args.name}.partial.json").unlink(missing_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    write_markdown(report, args.out / f"{args.name}.md")
    write_plot(report, args.out / f"{args.name}.png")
    print_ratios(report)


def _find(rows: list[dict], method: str, refinement: str, pattern: str) -> dict | None:
    for r in rows:
        if (r["method"], r["refinement"], r["pattern"]) == (method, refinement, pattern):
            return r
    return None


def ratio_lines(report: dict) -> list[str]:
    lines = []
    grid, timing = report["grid"], report["timing"]
    patterns = sorted({r["pattern"] for r in grid if r["pattern"] != "dense"})
    for pattern in patterns:
        for method in ("magnitude", "wanda", "sparsegpt"):
            base = _find(grid, method, "none", pattern)
            if base is None:
                continue
            for ref in ("dsnot", "exact"):
                r = _find(grid, method, ref, pattern)
                if r is not None:
                    lines.append(f"ppl {method}+{ref} / {method} at {pattern}: {r['ppl'] / base['ppl']:.3f} "
                                 f"({base['ppl']:.2f} -> {r['ppl']:.2f})")
    for pattern in sorted({r["pattern"] for r in timing}):
        base = _find(timing, "wanda", "none", pattern)
        for ref in ("dsnot", "exact"):
            r = _find(timing, "wanda", ref, pattern)
            if base and r:
                lines.append(
                    f"time {pattern}: Wanda+{ref} end-to-end / Wanda end-to-end = "
                    f"{r['end_to_end_seconds'] / base['end_to_end_seconds']:.3f}; {ref} mask time / Wanda mask "
                    f"time = {r['mask_seconds'] / max(base['mask_seconds'], 1e-9):.1f}")
    return lines


def print_ratios(report: dict) -> None:
    print("\n".join(ratio_lines(report)))


def write_markdown(report: dict, path: Path) -> None:
    s = report["settings"]
    out = [
        "# Refinement benchmark: SmolLM2-135M",
        "",
        f"Written by `scripts/bench_refine.py`. Calibration: {s['nsamples']} x {s['seqlen']} tokens from "
        f"`{Path(s['calibration']).name}` (seed 0). Evaluation: `{Path(s['eval_text']).name}`, paper protocol, "
        f"{s['eval_chunks']} chunks of {s['eval_seqlen']} tokens. torch {s['torch']}, {s['torch_threads']} threads. "
        f"Total run time {report['total_seconds'] / 60:.1f} min.",
        "",
        "Grid runs collect H for every method (to report the true calibration output error), so their times "
        "include that cost; the timing table below has the runs without it.",
        "",
        "| method | refinement | pattern | perplexity | achieved sparsity | mean swaps/row | Linears whose "
        "output error rose | mask time (s) | end-to-end (s) | peak RSS (MiB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["grid"]:
        if r["method"] == "dense":
            out.append(f"| dense | - | - | {r['ppl']:.2f} | 0 | - | - | - | - | - |")
            continue
        out.append(
            f"| {r['method']} | {r['refinement']} | {r['pattern']} | {r['ppl']:.2f} | {r['achieved_sparsity']:.4f} | "
            f"{r['swaps_mean']:.1f} | {r.get('linears_worsened', '-')}/{r.get('linears', '-')} | "
            f"{r['mask_seconds']:.1f} | {r['end_to_end_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |"
        )
    if report["timing"]:
        out += ["", "## Timing runs (Wanda init, no extra statistics)", "",
                "| refinement | pattern | mask time (s) | end-to-end (s) | peak RSS (MiB) |", "|---|---|---|---|---|"]
        for r in report["timing"]:
            out.append(f"| {r['refinement']} | {r['pattern']} | {r['mask_seconds']:.2f} | "
                       f"{r['end_to_end_seconds']:.1f} | {r['peak_rss_bytes'] / 2**20:.0f} |")
    if report.get("variance"):
        out += ["", "## DSnoT channel variance: within-sample (reference, default) vs pooled", "",
                "| pattern | within-sample | pooled |", "|---|---|---|"]
        for r in report["variance"]:
            base = _find(report["grid"], "wanda", "dsnot", r["pattern"])
            out.append(f"| {r['pattern']} | {base['ppl']:.2f} | {r['ppl']:.2f} |" if base else
                       f"| {r['pattern']} | - | {r['ppl']:.2f} |")
    errs = [r for r in report["grid"] if r["method"] == "wanda" and "layer_output_error" in r]
    if errs:
        out += ["", "## True calibration output error per layer (Wanda init; mean over the layer's Linears of "
                "sum dw^T H dw / sum W^T H W)", ""]
        for pattern in sorted({r["pattern"] for r in errs}):
            trio = {r["refinement"]: r for r in errs if r["pattern"] == pattern}
            if "none" not in trio:
                continue
            out += [f"Pattern {pattern}:", "", "| layer | " + " | ".join(trio) + " |",
                    "|---|" + "---|" * len(trio)]
            n_layers = len(trio["none"]["layer_output_error"])
            for i in range(n_layers):
                out.append(f"| {i} | " + " | ".join(f"{trio[k]['layer_output_error'][i]:.4f}" for k in trio) + " |")
            out.append("")
    out += ["", "## Ratios", "", *[f"- {line}" for line in ratio_lines(report)], ""]
    path.write_text("\n".join(out))


def write_plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = [r for r in report["grid"] if r["method"] != "dense"]
    patterns = [p for p in ("0.5", "0.6", "0.7", "2:4") if any(r["pattern"] == p for r in grid)]
    patterns += sorted({r["pattern"] for r in grid} - set(patterns))
    fig, ax = plt.subplots(figsize=(8, 5))
    styles = {"none": "-", "dsnot": "--", "exact": ":"}
    colors = {"magnitude": "tab:red", "wanda": "tab:blue", "sparsegpt": "tab:green"}
    for method in colors:
        for ref, style in styles.items():
            pts = [(i, r["ppl"]) for i, p in enumerate(patterns) if (r := _find(grid, method, ref, p))]
            if pts:
                label = method if ref == "none" else f"{method} + {ref}"
                ax.plot(*zip(*pts), style, marker="o", color=colors[method], label=label)
    dense = next(r["ppl"] for r in report["grid"] if r["method"] == "dense")
    ax.axhline(dense, color="black", lw=0.8, label=f"dense {dense:.1f}")
    ax.set_xticks(range(len(patterns)), [p if ":" in p else f"{float(p):.0%}" for p in patterns])
    ax.set_yscale("log")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("WikiText-2 perplexity (paper protocol)")
    ax.set_title("SmolLM2-135M: initial masks, with DSnoT and with the exact variant")
    ax.legend(fontsize=7, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
