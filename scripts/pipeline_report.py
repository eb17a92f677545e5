#!/usr/bin/env python
"""Tables, targets and a plot from the rows `scripts/bench_pipeline.py` cached (issue 14's benchmark).

Per model: perplexity of every variant at every pattern on every text; the best baseline cell (the
best of Wanda, SparseGPT, Wanda+DSnoT, SparseGPT+DSnoT) against the candidate chosen on WikiText-2
*validation* (per pattern, among the non-baseline variants), reported on the test texts with the
issue's targets; held-out layer errors against every baseline's, layer by layer (local, and against
the dense model's layer outputs where the rows have it); time ratios.

    python scripts/pipeline_report.py docs/bench_pipeline.rows.jsonl --name bench_pipeline
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ("wanda", "sparsegpt", "wanda+dsnot", "sparsegpt+dsnot")
TARGETS = {"0.5": 0.08, "0.6": 0.25, "0.7": 0.50, "2:4": 0.20}  # lower perplexity than the best baseline
SELECT_ON = "wiki-valid"
# validation differences below this are ties, won by the variant with fewer stages (cheaper to run):
# one validation text of 16 windows does not separate perplexities closer than this
TIE = 0.01
REPORT_ON = ("wiki-test", "c4-valid")
PATTERN_ORDER = ("0.5", "0.6", "0.7", "2:4")  # the plot's x axis


def load(paths: list[Path]) -> list[dict]:
    rows: dict[str, dict] = {}
    for path in paths:
        for line in path.read_text().splitlines():
            row = json.loads(line)
            rows[row["key"]] = row  # a later row of the same key wins
    return list(rows.values())


def choose(cells: dict[str, dict], text: str) -> str | None:
    """The non-baseline variant with the lowest perplexity on `text` (validation); a variant within
    ``TIE`` of the lowest and with fewer stages (``+`` parts) wins the tie."""
    candidates = {v: r for v, r in cells.items() if v not in BASELINES and v != "dense" and f"ppl:{text}" in r}
    if not candidates:
        return None
    best = min(r[f"ppl:{text}"] for r in candidates.values())
    ties = [v for v, r in candidates.items() if r[f"ppl:{text}"] <= best * (1 + TIE)]
    return min(ties, key=lambda v: (v.count("+"), candidates[v][f"ppl:{text}"]))


def layers_below_every(mine: list[float], baselines: list[list[float]]) -> int:
    """How many layers of `mine` are below every baseline's same layer."""
    return sum(m < min(b[i] for b in baselines) for i, m in enumerate(mine))


def summarise(rows: list[dict]) -> dict:
    out: dict = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        dense = next((r for r in mine if r["variant"] == "dense"), None)
        per_pattern = {}
        for pattern in dict.fromkeys(r["pattern"] for r in mine if r["pattern"] != "-"):
            cells = {r["variant"]: r for r in mine if r["pattern"] == pattern}
            chosen = choose(cells, SELECT_ON)
            entry: dict = {"variants": {v: {k: r[k] for k in r if k.startswith("ppl:") or k in
                                            ("refine_seconds", "sparsity")} for v, r in cells.items()},
                           "chosen_on_validation": chosen}
            present = [b for b in BASELINES if b in cells]
            entry["baselines_missing"] = [b for b in BASELINES if b not in cells]
            if chosen is not None and present:
                entry["targets"] = {}
                for text in REPORT_ON:
                    key = f"ppl:{text}"
                    best = min(present, key=lambda b: cells[b][key])
                    gain = 1 - cells[chosen][key] / cells[best][key]
                    entry["targets"][text] = {"best_baseline": best, "baseline_ppl": cells[best][key],
                                              "chosen_ppl": cells[chosen][key], "lower_by": gain,
                                              "target": TARGETS.get(pattern), "met": gain >= TARGETS.get(pattern, 1)}
                key = "heldout_layer_error"
                entry["heldout_layers_below_every_baseline"] = layers_below_every(
                    cells[chosen][key], [cells[b][key] for b in present])
                entry["layers"] = len(cells[chosen][key])
                key = "heldout_model_error"  # rows from before it was measured lack it
                if all(key in cells[v] for v in [*present, chosen]):
                    entry["heldout_model_layers_below_every_baseline"] = layers_below_every(
                        cells[chosen][key], [cells[b][key] for b in present])
                entry["time_ratio"] = {b: cells[chosen]["refine_seconds"] / cells[b]["refine_seconds"]
                                       for b in ("wanda", "sparsegpt") if b in cells}
            per_pattern[pattern] = entry
        out[model] = {"dense": dense and {k: dense[k] for k in dense if k.startswith("ppl:")},
                      "calibration": mine[0]["calibration"], "patterns": per_pattern}
    return out


def markdown(summary: dict, name: str) -> str:
    lines = [f"# Pipeline grid ({name})", "",
             "Written by `scripts/pipeline_report.py` from the rows of `scripts/bench_pipeline.py`. Perplexity, "
             "paper protocol. The candidate at each pattern is chosen on WikiText-2 validation "
             f"(`{SELECT_ON}`) among the non-baseline variants (within {TIE:.0%} of the lowest, the variant with "
             f"fewer stages wins the tie), and reported on {', '.join(REPORT_ON)}; the best "
             f"baseline is the best of {', '.join(BASELINES)} on each text. `refine (s)` is wall time on the machine "
             "that ran the row (2 cores here), not a clean timing when other jobs shared it.", ""]
    for model, m in summary.items():
        lines += [f"## {model} (calibration {m['calibration']} C4 train tokens)", ""]
        texts = sorted({k for p in m["patterns"].values() for v in p["variants"].values() for k in v
                        if k.startswith("ppl:")})
        if m["dense"]:
            lines += ["dense: " + ", ".join(f"{t[4:]} {m['dense'][t]:.2f}" for t in texts if t in m["dense"]), ""]
        for pattern, p in m["patterns"].items():
            lines += [f"### {pattern}", "", "| variant | " + " | ".join(t[4:] for t in texts)
                      + " | refine (s) |", "|---|" + "---|" * (len(texts) + 1)]
            for variant, v in p["variants"].items():
                mark = " (chosen)" if variant == p["chosen_on_validation"] else ""
                lines.append(f"| {variant}{mark} | " + " | ".join(
                    f"{v[t]:.2f}" if t in v else "-" for t in texts) + f" | {v.get('refine_seconds', 0):.0f} |")
            if p.get("targets"):
                lines.append("")
            for text, t in (p.get("targets") or {}).items():
                change = (f"{t['lower_by']:.1%} lower" if t["lower_by"] >= 0 else f"{-t['lower_by']:.1%} higher")
                lines.append(f"- {text}: chosen {t['chosen_ppl']:.2f} vs best baseline {t['best_baseline']} "
                             f"{t['baseline_ppl']:.2f}: {change} (target {t['target']:.0%} lower: "
                             f"{'met' if t['met'] else 'missed'})")
            if p.get("baselines_missing"):
                lines.append(f"- not yet run (so not in the best-baseline comparison): "
                             f"{', '.join(p['baselines_missing'])}")
            if "layers" in p:
                lines.append(f"- held-out layer error below every baseline's in {p['heldout_layers_below_every_baseline']}"
                             f" of {p['layers']} layers; refine time "
                             + ", ".join(f"/ {b}'s {r:.2f}" for b, r in p["time_ratio"].items()))
            if "heldout_model_layers_below_every_baseline" in p:
                lines.append(f"- held-out layer output error against the dense model's below every baseline's in "
                             f"{p['heldout_model_layers_below_every_baseline']} of {p['layers']} layers")
            lines.append("")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(summary)
    order = {p: i for i, p in enumerate(PATTERN_ORDER)}
    every = list(dict.fromkeys(v for m in summary.values() for p in m["patterns"].values() for v in p["variants"]))
    colors = {v: f"C{i % 10}" for i, v in enumerate(every)}  # one colour per variant in every panel
    fig, axes = plt.subplots(len(models), len(REPORT_ON), figsize=(6 * len(REPORT_ON), 4 * len(models)),
                             squeeze=False)
    for row, model in enumerate(models):
        patterns = sorted(summary[model]["patterns"], key=lambda p: (order.get(p, len(order)), p))
        variants = list(dict.fromkeys(v for p in summary[model]["patterns"].values() for v in p["variants"]))
        for col, text in enumerate(REPORT_ON):
            ax = axes[row][col]
            for variant in variants:
                ys = [summary[model]["patterns"][p]["variants"].get(variant, {}).get(f"ppl:{text}") for p in patterns]
                # NaN breaks the line: no segment across a pattern not run, none from a sparsity to N:M
                ys = [float("nan") if y is None or (i and ":" in p) else y for i, (y, p) in enumerate(zip(ys, patterns))]
                for i, p in enumerate(patterns):  # N:M patterns as lone markers
                    y = summary[model]["patterns"][p]["variants"].get(variant, {}).get(f"ppl:{text}")
                    if ":" in p and y is not None and i:
                        ax.plot([i], [y], marker="o", color=colors[variant])
                ax.plot(range(len(ys)), ys, marker="o", label=variant, color=colors[variant],
                        linestyle="--" if variant in BASELINES else "-")
            ax.set_xticks(range(len(patterns)), patterns)
            ax.set_yscale("log")
            ax.set_title(f"{model}: {text}")
            ax.set_ylabel("perplexity")
        axes[row][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("rows", type=Path, nargs="+")
    p.add_argument("--name", default="bench_pipeline")
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    args = p.parse_args()
    summary = summarise(load(args.rows))
    (args.out / f"{args.name}.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.out / f"{args.name}.md").write_text(markdown(summary, args.name))
    plot(summary, args.out / f"{args.name}.png")
    print((args.out / f"{args.name}.md").read_text())


if __name__ == "__main__":
    main()
