#!/usr/bin/env python
"""Per-step cost of the product's pruning code at real decoder-layer shapes (issue 16, first part).

One decoder layer's Linears (q, k, v, o, gate, up, down) at the shapes of SmolLM2-135M, Llama-3.2-1B
and Llama-3-8B, with random heavy-tailed weights and a random calibration batch (outlier channels, a
shared low-rank component, so Wanda scores and H are not degenerate). Each step is the product's own
function: statistics (`stats.accumulate`, X^T X), Wanda (`masks.wanda_mask`), SparseGPT
(`sparsegpt.sparsegpt_prune`), DSnoT (`dsnot.dsnot_refine` on the Wanda mask), exact
(`exact.exact_refine` on H shrunk 0.3 toward its diagonal, the default), ADMM (`reconstruct.reconstruct`
of the exact mask with the default solver: ADMM below 2048 columns, conjugate gradients from there), GPTQ Q4_0 (`quant.gptq.quantize_weight` of the
reconstructed weights). The default pipeline is wanda + exact + admm.

Bounded runs: a Linear of rows x cols is measured on a subset of its rows when rows*cols > --full-size
(rows are independent in every step; only the factorisations of H are row-independent), and its
full-rows time is extrapolated with the fitted per-row cost of the step: t(R) = t(r) + slope(cols) (R - r).
The extrapolation is checked on --verify (measured at the subset and at full rows). Statistics are
measured on --tokens tokens and scaled linearly to --project-tokens. Linears of the same shape (q/o,
k/v, gate/up) are measured once; Linears sharing an input share one H.

Cost model per step (non-negative least squares, relative residuals):
t = a c^3 + b c + e + r (p c^2 + q c); statistics: t = T (p c^2 + q c) + e.
Writes docs/bench_scale.{md,json}. Example: python scripts/bench_scale.py --threads 1
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dsnot_deploy.algorithms.config import (  # noqa: E402
    DSnoTConfig,
    PruneConfig,
    Solver,
    SparseGPTConfig,
)
from dsnot_deploy.algorithms.dsnot import dsnot_refine  # noqa: E402
from dsnot_deploy.algorithms.exact import exact_refine  # noqa: E402
from dsnot_deploy.algorithms.masks import wanda_mask  # noqa: E402
from dsnot_deploy.algorithms.pruner import shrink_toward_diagonal  # noqa: E402
from dsnot_deploy.algorithms.reconstruct import reconstruct, solver_for  # noqa: E402
from dsnot_deploy.algorithms.sparsegpt import sparsegpt_prune  # noqa: E402
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate  # noqa: E402
from dsnot_deploy.quant.gptq import QuantizeConfig, quantize_weight  # noqa: E402

WIDTHS = {  # hidden, MLP, heads, kv heads, head dim, decoder layers
    "smollm2-135m": (576, 1536, 9, 3, 64, 30),
    "llama-3.2-1b": (2048, 8192, 32, 8, 64, 16),
    "llama-3-8b": (4096, 14336, 32, 8, 128, 32),
    "smoke": (64, 128, 2, 1, 32, 2),
}
STEPS = ("wanda", "sparsegpt", "dsnot", "exact", "admm", "gptq")
PIPELINES = {"default (wanda+exact+admm)": ("wanda", "exact", "admm"), "sparsegpt": ("sparsegpt",),
             "wanda+dsnot": ("wanda", "dsnot"), "default + gptq Q4_0": ("wanda", "exact", "admm", "gptq")}


def linears(width: str) -> dict[str, tuple[int, int]]:
    """name -> (rows, cols) of one decoder layer's Linears."""
    h, m, nh, nkv, hd, _ = WIDTHS[width]
    return {"q_proj": (nh * hd, h), "k_proj": (nkv * hd, h), "v_proj": (nkv * hd, h), "o_proj": (h, nh * hd),
            "gate_proj": (m, h), "up_proj": (m, h), "down_proj": (h, m)}


LIBC = ctypes.CDLL("libc.so.6")
INPUTS = {"q/k/v": "q_proj", "o": "o_proj", "gate/up": "gate_proj", "down": "down_proj"}  # one H each


class Meter:
    """Wall time and peak memory of a block: RSS above the start (polled every 10 ms) on the CPU,
    torch's peak allocation above the start on CUDA."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> Meter:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            LIBC.malloc_trim(0)  # return freed heap first, so that reused memory shows as growth
            self.base = self.peak = self.rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._poll, daemon=True)
            self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _poll(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self.rss())

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.seconds = time.perf_counter() - self.t0
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2**20
        else:
            self.seconds = time.perf_counter() - self.t0
            self._stop.set()
            self._thread.join()
            self.peak_mb = (max(self.peak, self.rss()) - self.base) / 2**20


def calibration(cols: int, tokens: int, gen: torch.Generator) -> torch.Tensor:
    """(tokens, cols): heavy-tailed channel scales, 1% outlier channels x20, a shared rank-32 part."""
    scale = torch.exp(0.7 * torch.randn(cols, generator=gen))
    scale[torch.randperm(cols, generator=gen)[: max(1, cols // 100)]] *= 20.0
    low = torch.randn(tokens, 32, generator=gen) @ torch.randn(32, cols, generator=gen) / 4.0
    return (torch.randn(tokens, cols, generator=gen) + low) * scale


def weights(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Gaussian scale mixture (heavy tails) with per-row gains, std about 0.02."""
    w = torch.randn(rows, cols, generator=gen) * torch.exp(0.6 * torch.randn(rows, cols, generator=gen))
    return (w * 0.015 * torch.exp(0.3 * torch.randn(rows, 1, generator=gen))).contiguous()


def measure_stats(cols: int, tokens: int, seqlen: int, device: torch.device, gen: torch.Generator):
    x = calibration(cols, tokens, gen).to(device)
    stats = ChannelStats(cols, with_hessian=True, device=device)
    with Meter(device) as m:
        for s in range(0, tokens, seqlen):
            accumulate(stats, x[s:s + seqlen].unsqueeze(0))
        hessian = stats.hessian
    return stats, hessian, {"seconds": m.seconds, "peak_mb": m.peak_mb}


def measure_shape(w: torch.Tensor, stats: ChannelStats, hessian: torch.Tensor, steps: list[str],
                  device: torch.device) -> dict[str, dict]:
    """Every step on one weight matrix; each step's input is what the pipeline gives it."""
    cfg, out = PruneConfig(), {}
    pattern, sqnorm = cfg.pattern, stats.sqnorm

    def timed(step, fn):
        with Meter(device) as m:
            result = fn()
        out[step] = {"seconds": m.seconds, "peak_mb": m.peak_mb}
        return result

    mask = timed("wanda", lambda: wanda_mask(w, sqnorm, pattern))  # always: the others start from it
    if "sparsegpt" in steps:
        timed("sparsegpt", lambda: sparsegpt_prune(w, hessian, pattern, SparseGPTConfig()))
    if "dsnot" in steps:
        tsum, var = stats.tokensum, stats.variance(DSnoTConfig().variance)
        timed("dsnot", lambda: dsnot_refine(w, w * mask, mask, tsum, var, sqnorm, pattern, DSnoTConfig()))
    sparse = w * mask
    if "exact" in steps:
        res = timed("exact", lambda: exact_refine(w, w * mask, mask, shrink_toward_diagonal(hessian, cfg.exact.shrink),
                                                  pattern, cfg.exact))
        out["exact"]["swaps_mean"] = float(res.swaps.float().mean())
        mask, sparse = res.mask, res.weight
    if "admm" in steps:
        sparse = timed("admm", lambda: reconstruct(w, sparse, mask, hessian, cfg.reconstruct).float())
    if "gptq" in steps:
        timed("gptq", lambda: quantize_weight(sparse, hessian, QuantizeConfig()))
    return {s: v for s, v in out.items() if s in steps}


TERMS = {"stats": ["T*c^2", "T*c", "1"], "time": ["c^3", "c", "1", "r*c^2", "r*c"], "memory": ["c^2", "c", "1", "-", "r*c"]}


def terms(kind: str, c: int, r: int = 0, tokens: int = 0) -> list[float]:
    if kind == "stats":
        return [tokens * c * c, tokens * c, 1.0]
    return [c ** 3 if kind == "time" else c * c, c, 1.0, r * c * c if kind == "time" else 0.0, r * c]


def fit(points: list[dict], kind: str) -> dict:
    """NNLS fit of a cost model (time or memory) on relative residuals; coefficients and residuals."""

    a = np.array([terms(kind, p["cols"], p.get("rows", 0), p.get("tokens", 0)) for p in points], dtype=float)
    t = np.array([p["seconds"] for p in points], dtype=float)
    norm = a.max(axis=0)
    norm[norm == 0] = 1.0
    coef, _ = nnls((a / norm) / t[:, None], np.ones_like(t))
    coef = coef / norm
    rel = a @ coef / t - 1.0
    return {"kind": kind, "terms": TERMS[kind], "coef": coef.tolist(), "rel_rms": float(np.sqrt(np.mean(rel ** 2))),
            "rel_max": float(np.abs(rel).max()), "points": len(points)}


def model_key(step: str, cols: int) -> str:
    """The cost model of a step at `cols` columns: the reconstruction's default solver depends on the width
    (ADMM below ReconstructConfig.cg_from_cols, conjugate gradients from there), so it has one model per solver."""
    if step == "admm" and solver_for(cols, PruneConfig().reconstruct) is Solver.CG:
        return "admm (cg)"
    return step


def split_by_solver(step: str, points: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for p in points:
        groups.setdefault(model_key(step, p["cols"]), []).append(p)
    return groups


def predict(model: dict, rows: int, cols: int, tokens: int = 0) -> float:
    return float(np.dot(model["coef"], terms(model["kind"], cols, rows, tokens)))


def slope(model: dict, cols: int) -> float:
    """Fitted cost (seconds or MB) per extra row at `cols` columns."""
    return predict(model, 1, cols) - predict(model, 0, cols)


def sub_rows(rows: int, cols: int, args: argparse.Namespace) -> int:
    if rows * cols <= args.full_size:
        return rows
    return min(rows, max(32, int(round(rows * args.rows_fraction / 32)) * 32))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", nargs="+", default=["smollm2-135m", "llama-3.2-1b", "llama-3-8b"],
                   choices=sorted(WIDTHS))
    p.add_argument("--steps", nargs="+", default=list(STEPS), choices=STEPS)
    p.add_argument("--tokens", type=int, default=2048, help="calibration tokens measured for the statistics")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per accumulated sample")
    p.add_argument("--project-tokens", type=int, default=128 * 2048, help="calibration size of the projections")
    p.add_argument("--rows-fraction", type=float, default=1 / 16, help="row subset of Linears above --full-size")
    p.add_argument("--full-size", type=int, default=2 ** 21, help="Linears with rows*cols <= this run whole")
    p.add_argument("--verify", default="llama-3.2-1b:q_proj", help="WIDTH:LINEAR also measured at full rows")
    p.add_argument("--devices", nargs="+", default=["cpu", "cuda"], help="cuda is skipped when unavailable")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--cache", type=Path, help="JSONL of measured shapes, reused by a rerun with the same settings")
    p.add_argument("--remeasure", nargs="+", default=[], choices=STEPS,
                   help="steps measured again on shapes found in --cache (after a change of their code); the "
                        "cached numbers of the other steps are kept")
    p.add_argument("--remeasure-widths", nargs="+", choices=sorted(WIDTHS),
                   help="widths --remeasure applies to (default: all)")
    p.add_argument("--note", default="", help="a line for the Markdown (e.g. other jobs on the machine)")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--name", default="bench_scale")
    p.add_argument("--smoke", action="store_true", help="tiny widths, all steps, seconds (for the tests)")
    args = p.parse_args(argv)
    if args.smoke:
        args.widths, args.tokens, args.seqlen, args.project_tokens = ["smoke"], 256, 128, 1024
        args.full_size, args.rows_fraction, args.verify = 4096, 0.5, "smoke:gate_proj"
    return args


def run_device(args: argparse.Namespace, device: torch.device, cache: dict) -> dict:
    gen = torch.Generator().manual_seed(0)
    v_width, v_lin = args.verify.split(":")
    stats_pts, shape_pts = [], []
    remeasured: set[str] = set()
    for width in args.widths:
        lins = linears(width)
        by_cols: dict[int, tuple] = {}
        for cols in sorted({c for _, c in lins.values()}):
            key = json.dumps(["stats", device.type, width, cols, args.tokens, args.seqlen, args.threads])
            stats, hessian, meas = measure_stats(cols, args.tokens, args.seqlen, device, gen)
            if key not in cache and args.cache:
                with args.cache.open("a") as fh:
                    fh.write(json.dumps({"key": key, "value": meas}) + "\n")
            meas = cache.setdefault(key, meas)
            by_cols[cols] = (stats, hessian)
            stats_pts.append({"width": width, "cols": cols, "tokens": args.tokens, **meas})
            print(f"[{device.type}] {width} stats cols={cols} T={args.tokens}: {meas['seconds']:.2f} s, "
                  f"{meas['peak_mb']:.0f} MB", flush=True)
        shapes: dict[tuple[int, int], list[str]] = {}
        for name, shape in lins.items():
            shapes.setdefault(shape, []).append(name)
        for (rows, cols), names in shapes.items():
            row_counts = {sub_rows(rows, cols, args)}
            if width == v_width and v_lin in names:
                row_counts.add(rows)
            if width in ("smollm2-135m", "smoke"):
                row_counts.add(max(32, rows // 2))  # several row counts per cols: the fit's per-row terms
            for r in sorted(row_counts):
                key = json.dumps(["shape", device.type, width, r, cols, args.tokens, args.threads, sorted(args.steps)])
                again = ([s for s in args.remeasure if s in args.steps] if key in cache and key not in remeasured
                         and width in (args.remeasure_widths or [width]) else [])
                if key not in cache or again:
                    stats, hessian = by_cols[cols]
                    w = weights(r, cols, gen).to(device)
                    if again:  # the remeasured steps with the steps that make their inputs; the rest stays cached
                        remeasured.add(key)  # once a run (k/v and the gate/up subset can share a key)
                        inputs = {"admm": ["exact"], "gptq": ["exact", "admm"]}
                        need = sorted({*again, *(i for s in again for i in inputs.get(s, []) if i in args.steps)})
                        cache[key] = {**cache[key], **{s: v for s, v in
                                                       measure_shape(w, stats, hessian, need, device).items()
                                                       if s in again}}
                    else:
                        cache[key] = measure_shape(w, stats, hessian, args.steps, device)
                    del w
                    if args.cache:
                        with args.cache.open("a") as fh:
                            fh.write(json.dumps({"key": key, "value": cache[key]}) + "\n")
                res = cache[key]
                shape_pts.append({"width": width, "linears": names, "rows": r, "full_rows": rows, "cols": cols,
                                  "steps": res})
                print(f"[{device.type}] {width} {'/'.join(names)} {r}/{rows}x{cols}: "
                      + ", ".join(f"{s} {v['seconds']:.2f}s {v['peak_mb']:.0f}MB" for s, v in res.items()),
                      flush=True)
        del by_cols
    return summarise(args, stats_pts, shape_pts)


def summarise(args: argparse.Namespace, stats_pts: list[dict], shape_pts: list[dict]) -> dict:
    models = {"stats": fit(stats_pts, "stats")}
    mem_models = {}
    unique = {(p["width"], p["rows"], p["cols"]): p for p in shape_pts}.values()  # k/v and gate/up subsets coincide
    for step in args.steps:
        pts = [{"rows": p["rows"], "cols": p["cols"], **p["steps"][step]} for p in unique]
        for key, group in split_by_solver(step, pts).items():  # one cost model per algorithm
            models[key] = fit(group, "time")
            mem_models[key] = fit([{**p, "seconds": max(p["peak_mb"], 1.0)} for p in group], "memory")
    widths = {}
    for width in args.widths:
        lins, n_layers = linears(width), WIDTHS[width][5]
        st = {p["cols"]: p for p in stats_pts if p["width"] == width}
        stats_layer = sum(st[lins[lin][1]]["seconds"] for lin in INPUTS.values()) * args.project_tokens / args.tokens
        per_lin: dict[str, dict[str, dict]] = {}
        for name, (rows, cols) in lins.items():
            cands = [p for p in shape_pts if p["width"] == width and name in p["linears"]]
            full = [p for p in cands if p["rows"] == rows]
            sub = min(cands, key=lambda p: p["rows"])  # extrapolated from (the verification compares)
            per_lin[name] = {}
            for step in args.steps:
                meas = sub["steps"][step]
                key = model_key(step, cols)
                t_ext = meas["seconds"] + slope(models[key], cols) * (rows - sub["rows"])
                mem_ext = meas["peak_mb"] + slope(mem_models[key], cols) * (rows - sub["rows"])
                per_lin[name][step] = {"rows_measured": full[0]["rows"] if full else sub["rows"],
                                       "rows_subset": sub["rows"], "seconds_subset": meas["seconds"],
                                       "seconds": full[0]["steps"][step]["seconds"] if full else t_ext,
                                       "seconds_from_subset": t_ext, "extrapolated": not full,
                                       "peak_mb_measured": meas["peak_mb"], "peak_mb": mem_ext,
                                       "model_seconds": predict(models[key], rows, cols)}
        layer = {s: sum(per_lin[n][s]["seconds"] for n in lins) for s in args.steps}
        layer_model = {s: sum(per_lin[n][s]["model_seconds"] for n in lins) for s in args.steps}
        peak = {s: max(per_lin[n][s]["peak_mb"] for n in lins) for s in args.steps}
        pipes = {k: sum(layer[s] for s in v) for k, v in PIPELINES.items() if all(s in args.steps for s in v)}
        ratio = (pipes["default (wanda+exact+admm)"] / pipes["sparsegpt"]
                 if {"default (wanda+exact+admm)", "sparsegpt"} <= set(pipes) else None)
        widths[width] = {"layers": n_layers, "linears": per_lin, "layer_seconds": layer,
                         "layer_model_seconds": layer_model, "layer_peak_mb": peak, "stats_layer_seconds": stats_layer,
                         "stats": st, "pipelines_layer_seconds": pipes,
                         "pipelines_model_seconds": {k: pipes[k] * n_layers for k in pipes},
                         "ratio_default_over_sparsegpt": ratio}
    v_width, v_lin = args.verify.split(":")
    verify = None
    if v_width in widths:
        v = widths[v_width]["linears"][v_lin]
        verify = {s: {"measured_full": v[s]["seconds"], "from_subset": v[s]["seconds_from_subset"],
                      "rows_subset": v[s]["rows_subset"], "rel_error": v[s]["seconds_from_subset"] / v[s]["seconds"] - 1}
                  for s in args.steps}
    return {"models": models, "memory_models": mem_models, "widths": widths, "verify": verify,
            "stats_points": stats_pts, "shape_points": shape_pts}


def fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else (f"{x:,.0f}" if x < 36000 else f"{x / 3600:,.1f} h")


def markdown(args: argparse.Namespace, meta: dict, results: dict) -> str:
    out = [f"# Per-step cost at real decoder-layer widths ({args.name})", "",
           f"`python scripts/bench_scale.py {' '.join(meta['argv'])}`", "",
           "Machine: " + ", ".join(f"{k} {v}" for k, v in meta["machine"].items()) + ".", ""]
    if args.note:
        out += [args.note, ""]
    out += [f"Load average (1 min) at start {meta['load_start'][0]:.2f}, at end {meta['load_end'][0]:.2f}; "
            f"whole run {meta['seconds']:.0f} s.", ""]
    for dev, res in results.items():
        if res is None:
            out += [f"## {dev}: skipped (torch.cuda.is_available() is False)", ""]
            continue
        out += [f"## {dev}", "", "### Per layer (seconds; all 7 Linears, full rows)", "",
                "Statistics: the 4 inputs' X^T X at " f"{args.project_tokens} calibration tokens "
                f"(measured at {args.tokens}, scaled linearly). Steps: measured on a row subset where marked * and "
                "extrapolated with the fitted per-row cost; peak = the largest Linear's extra memory (MB).", ""]
        ws = list(res["widths"])
        out += ["| step | " + " | ".join(f"{w} s | {w} peak MB" for w in ws) + " |",
                "|---|" + "---|---|" * len(ws)]
        out.append("| statistics | " + " | ".join(
            f"{fmt_s(res['widths'][w]['stats_layer_seconds'])} | "
            f"{max(p['peak_mb'] for p in res['widths'][w]['stats'].values()):.0f}" for w in ws) + " |")
        for s in args.steps:
            cells = []
            for w in ws:
                d = res["widths"][w]
                star = "*" if any(d["linears"][n][s]["extrapolated"] for n in d["linears"]) else ""
                cells.append(f"{fmt_s(d['layer_seconds'][s])}{star} | {d['layer_peak_mb'][s]:.0f}{star}")
            out.append(f"| {s} | " + " | ".join(cells) + " |")
        out += ["", "### Pipelines: per layer, whole model (layers x per layer), ratio", "",
                "| width (layers) | pipeline | per layer (s) | whole model | + statistics, whole model |",
                "|---|---|---|---|---|"]
        for w in ws:
            d = res["widths"][w]
            for k, v in d["pipelines_layer_seconds"].items():
                out.append(f"| {w} ({d['layers']}) | {k} | {fmt_s(v)} | {fmt_s(v * d['layers'])} | "
                           f"{fmt_s((v + d['stats_layer_seconds']) * d['layers'])} |")
        out += ["", "| width | default / SparseGPT per layer | target <= 1.5 (8B width) |", "|---|---|---|"]
        for w in ws:
            r = res["widths"][w]["ratio_default_over_sparsegpt"]
            target = ("met" if r <= 1.5 else "**missed**") if (w == "llama-3-8b" and r is not None) else "-"
            out.append(f"| {w} | {r:.2f} | {target} |" if r is not None else f"| {w} | - | - |")
        out += ["", "### Per Linear (seconds at full rows; rows measured; * = extrapolated)", ""]
        for w in ws:
            d = res["widths"][w]
            out += [f"**{w}**", "", "| Linear | rows x cols | rows measured | " + " | ".join(args.steps) + " |",
                    "|---|---|---|" + "---|" * len(args.steps)]
            for n, (rows, cols) in linears(w).items():
                e = d["linears"][n]
                any_s = next(iter(e.values()))
                out.append(f"| {n} | {rows} x {cols} | {any_s['rows_measured']} | " + " | ".join(
                    f"{fmt_s(e[s]['seconds'])}{'*' if e[s]['extrapolated'] else ''}" for s in args.steps) + " |")
            out.append("")
        out += ["### Cost model fit (seconds; c = cols, r = rows, T = tokens)", "",
                "| step | " + " | ".join(["terms: coefficient", "rel. RMS residual", "max rel. residual",
                                          "points"]) + " |", "|---|---|---|---|---|"]
        for s, m in res["models"].items():
            terms = ", ".join(f"{t}: {c:.3g}" for t, c in zip(m["terms"], m["coef"]) if c)
            out.append(f"| {s} | {terms} | {m['rel_rms']:.1%} | {m['rel_max']:.1%} | {m['points']} |")
        out += ["", "Peak memory model (MB; c^2, c, 1, r*c terms), used to extrapolate peaks to full rows: " + "; ".join(
            f"{s} rel. RMS {m['rel_rms']:.0%}" for s, m in res["memory_models"].items()) + "."]
        out += ["", "Per layer from the fitted model alone vs the measured/extrapolated numbers above:", "",
                "| width | " + " | ".join(args.steps) + " |", "|---|" + "---|" * len(args.steps)]
        for w in ws:
            d = res["widths"][w]
            out.append(f"| {w} | " + " | ".join(f"{fmt_s(d['layer_model_seconds'][s])} vs {fmt_s(d['layer_seconds'][s])}"
                                               for s in args.steps) + " |")
        if res["verify"]:
            out += ["", f"### Check of the row extrapolation: {args.verify}", "",
                    "| step | measured, full rows (s) | from the subset (s) | subset rows | error |", "|---|---|---|---|---|"]
            for s, v in res["verify"].items():
                out.append(f"| {s} | {v['measured_full']:.3g} | {v['from_subset']:.3g} | {v['rows_subset']} | "
                           f"{v['rel_error']:+.1%} |")
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cache: dict = {}
    if args.cache and args.cache.exists():
        for line in args.cache.read_text().splitlines():
            row = json.loads(line)
            cache[row["key"]] = row["value"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    meta = {"argv": sys.argv[1:] if argv is None else argv, "load_start": os.getloadavg(),
            "machine": {"CPU": cpu, "cores": os.cpu_count(), "torch threads": torch.get_num_threads(),
                        "torch": torch.__version__, "python": platform.python_version()}}
    t0 = time.perf_counter()
    results: dict = {}
    for dev in args.devices:
        if dev == "cuda" and not torch.cuda.is_available():
            print("cuda: not available, skipped", flush=True)
            results["cuda"] = None
            continue
        if dev == "cuda":
            meta["machine"]["GPU"] = torch.cuda.get_device_name(0)
        results[dev] = run_device(args, torch.device(dev), cache)
    meta["seconds"], meta["load_end"] = time.perf_counter() - t0, os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    text = markdown(args, meta, results)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "args": {k: str(v) for k, v in vars(args).items()},
                                                           "results": results}, indent=1, default=float))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
