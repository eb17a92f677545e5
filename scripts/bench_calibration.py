#!/usr/bin/env python
"""Calibration that generalises (issue 14, part 3): calibration vs held-out layer output error as the
calibration set grows, for each way of choosing a Linear's sparse weights.

SmolLM2-135M runs dense on C4 *train* windows of each size (calibration) and on WikiText-2
*validation* windows (held out, never seen by any fit; validation text, so a setting chosen here is
not chosen on the test texts); for some Linears of some layers it collects H on both.
For each pattern and size, each variant fits the Linear on the calibration H alone; the script
reports its output error sum_i dw_i^T H dw_i relative to Wanda's, on the calibration H and on the
held-out H (averaged over the Linears). Layers see the dense prefix (a study of the fit, not of
error propagation). Variants: SparseGPT; Wanda + exact search (shrink a: the search judges swaps on
(1-a) H + a diag H); Wanda + ADMM reconstruction; exact + ADMM (with --rounds R, the search re-run
against the reconstructed weights and reconstruction again, up to R rounds). Writes
docs/bench_calibration.{md,json}.

    python scripts/bench_calibration.py --sizes 16x512 64x1024 128x2048 --layers 2 10
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
    ExactConfig,
    PruneConfig,
    ReconstructConfig,
    SparseGPTConfig,
    SparsityPattern,
)
from dsnot_deploy.algorithms.exact import exact_refine, row_errors  # noqa: E402
from dsnot_deploy.algorithms.masks import wanda_mask  # noqa: E402
from dsnot_deploy.algorithms.pruner import shrink_toward_diagonal  # noqa: E402
from dsnot_deploy.algorithms.reconstruct import admm_reconstruct  # noqa: E402
from dsnot_deploy.algorithms.sparsegpt import sparsegpt_prune  # noqa: E402
from dsnot_deploy.layerwise.capture import capture_layer_inputs  # noqa: E402
from dsnot_deploy.layerwise.driver import DriverConfig, _calibrate, _linears, _run_layer  # noqa: E402
from dsnot_deploy.sources.models import find_decoder_layers, load_model  # noqa: E402
from dsnot_deploy.sources.textdata import (  # noqa: E402
    load_text_source,
    sample_calibration,
    tokenize_eval,
)

SHARED = ROOT.parent / "shared" / "data"
LINEARS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.down_proj")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train" / "c4_sample.jsonl"))
    p.add_argument("--heldout", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.valid.raw"),
                   help="held-out text: its first N x L tokens (paper-protocol token stream), as N windows")
    p.add_argument("--heldout-size", default="32x1024")
    p.add_argument("--sizes", nargs="+", default=["16x512", "64x1024"])
    p.add_argument("--layers", type=int, nargs="+", default=[2, 10])
    p.add_argument("--patterns", nargs="+", default=["0.5", "0.7", "2:4"])
    p.add_argument("--shrinks", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    p.add_argument("--rounds", type=int, default=1,
                   help="also alternate search and reconstruction, up to this many rounds")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    p.add_argument("--name", default="bench_calibration")
    return p.parse_args()


def _size(text: str) -> tuple[int, int]:
    n, l = text.lower().split("x")
    return int(n), int(l)


def heldout_windows(tok, path: str, size: tuple[int, int]) -> torch.Tensor:
    ids = tokenize_eval(tok, load_text_source(path).eval_text("paper"))
    n, length = size
    if ids.numel() < n * length:
        raise SystemExit(f"{path} has {ids.numel()} tokens, fewer than {n} x {length}")
    return ids[: n * length].view(n, length)


def collect(model, samples: torch.Tensor, layers_wanted: list[int]) -> dict[str, dict]:
    """Per wanted Linear: dense weight, H and Wanda's sqnorm from the windows `samples` (dense prefix)."""
    _, layers = find_decoder_layers(model)
    hidden, calls = capture_layer_inputs(model, layers, samples, 1, "cpu", "cpu")
    out = torch.empty_like(hidden)
    cfg = DriverConfig(prune=PruneConfig(), progress=False)
    found: dict[str, dict] = {}
    for i in range(max(layers_wanted) + 1):
        if i in layers_wanted:
            lin = _linears(layers[i])
            stats = _calibrate(layers[i], lin, hidden, calls[i], cfg, True)
            for name in LINEARS:
                found[f"{i}.{name}"] = {"weight": lin[name].weight.detach().float().clone(),
                                        "h": stats[name].hessian.clone(), "sqnorm": stats[name].sqnorm.clone()}
        _run_layer(layers[i], hidden, calls[i], 1, "cpu", out)
        hidden, out = out, hidden
    return found


def variants(w: torch.Tensor, h: torch.Tensor, sq: torch.Tensor, pattern: SparsityPattern,
             shrinks: list[float], rounds: int = 1) -> dict[str, torch.Tensor]:
    mask = wanda_mask(w, sq, pattern)
    wanda = w * mask
    out = {"wanda": wanda}
    out["sparsegpt"] = sparsegpt_prune(w, h, pattern, SparseGPTConfig())[0]
    recon = ReconstructConfig()
    out["wanda+admm"] = admm_reconstruct(w, wanda, mask, h, recon).float()
    for a in shrinks:
        searched = shrink_toward_diagonal(h, a)
        res = exact_refine(w, wanda, mask, searched, pattern, ExactConfig(shrink=a))
        out[f"exact(a={a:g})"] = res.weight
        current = out[f"exact(a={a:g})+admm"] = admm_reconstruct(w, res.weight, res.mask, h, recon).float()
        current_mask = res.mask
        for r in range(2, rounds + 1):  # alternate: search against the reconstructed weights, reconstruct
            res = exact_refine(w, current, current_mask, searched, pattern, ExactConfig(shrink=a))
            current, current_mask = admm_reconstruct(w, res.weight, res.mask, h, recon).float(), res.mask
            out[f"exact(a={a:g})+admm x{r}"] = current
    return out


def main() -> None:
    args = parse_args()
    torch.manual_seed(0)
    t_start = time.perf_counter()
    loaded = load_model(args.model)
    model, tok = loaded.model, loaded.tokenizer
    held = collect(model, heldout_windows(tok, args.heldout, _size(args.heldout_size)), args.layers)
    calib_docs = list(load_text_source(args.calib).documents)
    rows = []
    for size_text in args.sizes:
        t0 = time.perf_counter()
        n, length = _size(size_text)
        cal = collect(model, sample_calibration(tok, calib_docs, n, length, seed=0), args.layers)
        print(f"{size_text}: statistics in {time.perf_counter() - t0:.0f} s", flush=True)
        for pattern_text in args.patterns:
            pattern = SparsityPattern.parse(pattern_text)
            per_variant: dict[str, dict[str, list[float]]] = {}
            for key, m in cal.items():
                w, h, h_held = m["weight"], m["h"], held[key]["h"]
                fits = variants(w, h, m["sqnorm"], pattern, args.shrinks, args.rounds)
                base_cal = float(row_errors(w, fits["wanda"], h).sum())
                base_held = float(row_errors(w, fits["wanda"], h_held).sum())
                for name, fit in fits.items():
                    entry = per_variant.setdefault(name, {"calibration": [], "heldout": []})
                    entry["calibration"].append(float(row_errors(w, fit, h).sum()) / base_cal)
                    entry["heldout"].append(float(row_errors(w, fit, h_held).sum()) / base_held)
            for name, entry in per_variant.items():
                row = {"size": size_text, "tokens": _size(size_text)[0] * _size(size_text)[1], "pattern": pattern_text,
                       "variant": name, "calibration": sum(entry["calibration"]) / len(entry["calibration"]),
                       "heldout": sum(entry["heldout"]) / len(entry["heldout"]),
                       "heldout_per_linear": entry["heldout"]}
                rows.append(row)
                print(f"  {pattern_text:4s} {name:18s} calibration {row['calibration']:.3f}  held-out "
                      f"{row['heldout']:.3f}", flush=True)
    write(args, rows, time.perf_counter() - t_start)


def write(args: argparse.Namespace, rows: list[dict], seconds: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "calib": Path(args.calib).name, "heldout": Path(args.heldout).name,
            "heldout_size": args.heldout_size, "layers": args.layers, "linears": list(LINEARS),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": seconds}
    (args.out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    names = list(dict.fromkeys(r["variant"] for r in rows))
    lines = [f"# Calibration size vs held-out layer error: {args.model}", "",
             f"Written by `scripts/bench_calibration.py`. Calibration: C4 train windows ({meta['calib']}); held out: "
             f"the first {args.heldout_size} tokens of {meta['heldout']}. Layers {args.layers}, Linears "
             f"{', '.join(LINEARS)}, dense prefix. Each cell: output error sum_i dw_i^T H dw_i relative to Wanda's, "
             f"mean over the {len(args.layers) * len(LINEARS)} Linears, as calibration / held-out. "
             f"torch {meta['torch']}, {meta['threads']} threads, {seconds / 60:.1f} min.", ""]
    for pattern in dict.fromkeys(r["pattern"] for r in rows):
        lines += [f"## Pattern {pattern}", "", "| calibration | " + " | ".join(names) + " |",
                  "|---|" + "---|" * len(names)]
        for size in dict.fromkeys(r["size"] for r in rows):
            cells = {r["variant"]: r for r in rows if r["pattern"] == pattern and r["size"] == size}
            lines.append(f"| {size} | " + " | ".join(
                f"{cells[n]['calibration']:.3f} / {cells[n]['heldout']:.3f}" for n in names) + " |")
        lines.append("")
    (args.out / f"{args.name}.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
