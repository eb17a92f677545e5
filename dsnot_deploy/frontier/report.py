"""The frontier's outputs: ``frontier.json`` (settings and every row with its ratio to dense F16 and
its place on the GGUF-size and pack-size fronts), ``frontier.md`` (the table and one computed
sentence naming each front) and ``frontier.png`` (size vs perplexity ratio, fronts drawn), all
written atomically (``dsnot_deploy.atomic``)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

from dsnot_deploy.atomic import atomic_write_bytes
from dsnot_deploy.frontier.pareto import front_indices, on_front
from dsnot_deploy.frontier.plan import REFERENCE_TYPE

SIZES = (("gguf", "GGUF"), ("pack", "pack"))  # (row key prefix, words)
MIB = 2**20


def with_fronts(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows with ``ratio`` (ppl / the dense F16 row's) and ``on_gguf_front`` / ``on_pack_front``."""
    ref = next((r for r in rows if r["sparsity"] is None and r["type"] == REFERENCE_TYPE), None)
    base = ref["ppl"] if ref is not None else float("nan")
    out = [{**r, "ratio": r["ppl"] / base} for r in rows]
    for size, _ in SIZES:
        flags = on_front([(float(r[f"{size}_bytes"]), float(r["ppl"])) for r in out])
        for r, flag in zip(out, flags):
            r[f"on_{size}_front"] = flag
    return out


def _names(labels: list[str]) -> str:
    if len(labels) <= 2:
        return " and ".join(labels)
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def front_sentence(rows: list[dict[str, Any]], model: str) -> str:
    """One sentence naming the configurations on each front, smallest first (computed from the rows)."""
    parts = []
    for size, words in SIZES:
        points = [(float(r[f"{size}_bytes"]), float(r["ppl"])) for r in rows]
        front = [rows[i] for i in front_indices(points)]
        sparse = [r for r in front if r["sparsity"] is not None]
        what = (f"{len(sparse)} sparse" if sparse else "no sparse configuration")
        parts.append(f"by {words} size the front is {_names([r['label'] for r in front])} ({what})")
    return f"For {model}, {parts[0]}; {parts[1]}."


def build(rows: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The JSON document: settings, the front sentence and the rows (in the plan's order)."""
    full = with_fronts(rows)
    return {"settings": settings, "reference": f"dense {REFERENCE_TYPE}",
            "sentence": front_sentence(full, settings["model"]), "rows": full}


def markdown(doc: dict[str, Any]) -> str:
    s = doc["settings"]
    ev, cal = s["eval"], s["calibration"]
    chunks = "all" if ev["max_chunks"] is None else ev["max_chunks"]
    lines = [f"# Size/quality frontier of {s['model']}", "",
             (f"Perplexity in llama.cpp ({ev['protocol']} protocol, text {ev['text']}"
             f"{'/' + ev['split'] if ev['split'] else ''}, {chunks} chunks of {ev['ctx']} tokens, the same tokens "
             f"for every file); ratio = ppl / dense {REFERENCE_TYPE}'s. Sparse files: refine (calibration "
             f"{cal['source']}, {cal['nsamples']} x {cal['seqlen']}, method {s['prune'].get('method')}, refinement "
             f"{s['prune'].get('refinement')}, update {s['prune'].get('update')}, allocation "
             f"{(s['prune'].get('allocation') or {}).get('kind')}); `+rq` = refined with `--quantize TYPE` (weights "
             f"placed on the type's lattice inside refinement). GGUFs: `dsnot-deploy export --type TYPE` of the "
             f"dense model's checkpoint or the refined one (importance matrix `auto`: the refined checkpoint's "
             f"calibration statistics for llama.cpp-written types, none for the dense model). Packs: "
             f"`dsnot-deploy pack` levels `{s['pack']['name']}` ({s['pack']['levels']})."), "",
             doc["sentence"], "",
             "| configuration | GGUF MiB | pack MiB | ppl | ratio | GGUF front | pack front | sparsity | on lattice |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["rows"]:
        sp = "" if r["sparsity_achieved"] is None else f"{r['sparsity_achieved']:.3f}"
        lat = "" if not r.get("on_lattice") or r["on_lattice"][0] is None else f"{r['on_lattice'][0]}/{r['on_lattice'][1]}"
        lines.append(f"| {r['label']} | {r['gguf_bytes'] / MIB:.1f} | {r['pack_bytes'] / MIB:.1f} | {r['ppl']:.3f} | "
                     f"{r['ratio']:.3f} | {'yes' if r['on_gguf_front'] else ''} | "
                     f"{'yes' if r['on_pack_front'] else ''} | {sp} | {lat} |")
    return "\n".join(lines) + "\n"


def _style(row: dict[str, Any], sparsities: list[str]) -> dict[str, Any]:
    colors = ["tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink"]
    if row["sparsity"] is None:
        return {"marker": "o", "color": "tab:blue"}
    color = colors[sparsities.index(row["sparsity"]) % len(colors)]
    return {"marker": "D" if row["quantized"] else "s", "color": color}


def plot_png(doc: dict[str, Any]) -> bytes:
    """Two panels (GGUF size, pack size) of perplexity ratio vs MiB; each front a dashed staircase,
    its points labelled."""
    import matplotlib

    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib.figure import (
        Figure,  # a bare Figure never touches pyplot's global state
    )
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter

    rows = doc["rows"]
    sparsities = list(dict.fromkeys(r["sparsity"] for r in rows if r["sparsity"] is not None))
    fig = Figure(figsize=(13, 5.2), dpi=110)
    for k, (size, words) in enumerate(SIZES):
        ax = fig.add_subplot(1, 2, k + 1)
        xs = [r[f"{size}_bytes"] / MIB for r in rows]
        ys = [r["ratio"] for r in rows]
        for x, y, r in zip(xs, ys, rows):
            st = _style(r, sparsities)
            front = r[f"on_{size}_front"]
            ax.scatter([x], [y], s=46 if front else 30, marker=st["marker"], edgecolors=st["color"],
                       facecolors=st["color"] if front else "none", linewidths=1.2, zorder=3)
        idx = front_indices(list(zip(xs, ys)))
        if idx:
            fx = [xs[i] for i in idx]
            fy = [ys[i] for i in idx]
            ax.step(fx + [max(xs) * 1.02], fy + [fy[-1]], where="post", color="k", ls="--", lw=1, zorder=2)
            for i in idx:
                ax.annotate(rows[i]["label"], (xs[i], ys[i]), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_yscale("log")
        for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
            axis(FuncFormatter(lambda v, _: f"{v:.2f}"))
        ax.set_xlabel(f"{words} size (MiB)")
        ax.set_ylabel(f"perplexity / dense {REFERENCE_TYPE}")
        ax.set_title(f"{words} size vs llama.cpp perplexity (front: filled, dashed)", fontsize=9)
        ax.grid(alpha=0.3, which="both")
    handles = [Line2D([], [], ls="", marker="o", color="tab:blue", label="dense")]
    for s in sparsities:
        st = _style({"sparsity": s, "quantized": False}, sparsities)
        handles.append(Line2D([], [], ls="", marker="s", color=st["color"], label=f"sparse {s}"))
    if any(r["quantized"] for r in rows):
        handles.append(Line2D([], [], ls="", marker="D", color="gray", label="+rq (quantized in refinement)"))
    fig.axes[0].legend(handles=handles, fontsize=8, loc="upper right")
    fig.suptitle(f"{doc['settings']['model']}: size/quality frontier", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_reports(rows: list[dict[str, Any]], settings: dict[str, Any], outdir: Path) -> dict[str, Any]:
    """Write frontier.json, frontier.md and frontier.png into ``outdir``; return the JSON document."""
    doc = build(rows, settings)
    outdir = Path(outdir)
    atomic_write_bytes(outdir / "frontier.json", (json.dumps(doc, indent=1) + "\n").encode())
    atomic_write_bytes(outdir / "frontier.md", markdown(doc).encode())
    atomic_write_bytes(outdir / "frontier.png", plot_png(doc))
    return doc
