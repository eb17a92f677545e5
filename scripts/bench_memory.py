"""Peak host memory and wall time of `refine`, streaming vs in memory, against model depth.

Random-weight Llama shapes of one width (hidden 256, intermediate 1024, 4 heads) at depths
4, 8, 16 and 32 are saved once as safetensors checkpoints in a temporary folder.  Each run is a
fresh Python process that refines one checkpoint (Wanda 50%, refinement `--refine`, default
none; CPU, float32) and reports its peak RSS and the wall time of the `refine` call.  Peak RSS is
the child's own high-water mark, `VmHWM` of /proc/self/status (Linux).  Not `ru_maxrss`: Linux
carries the spawning process's peak RSS into the child's `ru_maxrss` at exec, so a child started by
this script (which builds each checkpoint in memory first) would report at least this script's own
peak, which grows with depth.  Both are recorded in the JSON, with this script's peak at spawn time.  The slope of peak RSS against depth (least squares, MB per layer)
is printed for both modes next to the size of one layer's weights.

    python scripts/bench_memory.py            # about 5-10 minutes on 2 shared cores
    python scripts/bench_memory.py --depths 2 4 --nsamples 2   # quick look

Writes docs/bench_memory.json and docs/bench_memory.md (use --out-dir to change).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TEXT = " ".join(f"Sentence {i} says hello world; the quick brown fox jumps over the lazy dog." for i in range(400))

CHILD = """
import json, resource, sys, time
from pathlib import Path
def proc_status():  # kB fields of /proc/self/status, in MB; empty off Linux
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return {}
    return {k: int(v.split()[0]) / 1024 for k, _, v in (line.partition(":") for line in lines)
            if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile") and v.strip().endswith("kB")}
from dsnot_deploy.algorithms.config import PruneConfig, Refinement
from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob, refine
ckpt, out, calib, stream, nsamples, seqlen, refinement = sys.argv[1:8]
t0 = time.perf_counter()
manifest = refine(RefineJob(model=ckpt, outdir=Path(out), calibration=CalibrationConfig(calib, int(nsamples), int(seqlen), 0),
                            prune=PruneConfig(refinement=Refinement(refinement)), progress=False, stream=stream == "1"))
wall = time.perf_counter() - t0
status = proc_status()
ru_maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"peak_rss_mb": status.get("VmHWM", ru_maxrss), "peak_from": "VmHWM" if status else "ru_maxrss",
                  "ru_maxrss_mb": ru_maxrss, "end_rss_anon_mb": status.get("RssAnon"),
                  "end_rss_file_mb": status.get("RssFile"), "refine_seconds": wall,
                  "mask_seconds": manifest["times"]["mask_seconds"]}))
"""


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys against xs."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=1024)
    parser.add_argument("--nsamples", type=int, default=4)
    parser.add_argument("--seqlen", type=int, default=64)
    parser.add_argument("--refine", default="none", choices=["none", "dsnot", "exact"],
                        help="refinement after Wanda (default none: the exact one's per-Linear working set does "
                             "not depend on depth, and it would take most of the time)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "docs")
    args = parser.parse_args()

    from tests.tiny_models import make_tiny_model, save_tiny_checkpoint

    width = dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=4,
                 num_key_value_heads=4, head_dim=args.hidden // 4)
    layer_mb = sum(p.numel() for p in make_tiny_model("llama", num_hidden_layers=1, **width)
                   .model.layers[0].parameters()) * 4 / 2**20
    rows = []
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        root = Path(tmp)
        calib = root / "calib.txt"
        calib.write_text(TEXT)
        for depth in args.depths:
            ckpt = save_tiny_checkpoint(root / f"llama-{depth}", arch="llama", num_hidden_layers=depth, **width)
            for stream in (True, False):
                out = root / f"out-{depth}-{int(stream)}"
                parent_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
                t0 = time.perf_counter()
                result = subprocess.run(
                    [sys.executable, "-c", CHILD, str(ckpt), str(out), str(calib), "1" if stream else "0",
                     str(args.nsamples), str(args.seqlen), args.refine],
                    capture_output=True, text=True, cwd=ROOT, check=False,
                )
                if result.returncode:
                    print(result.stderr[-2000:], file=sys.stderr)
                    return 1
                row = {"depth": depth, "mode": "stream" if stream else "in-memory",
                       "process_seconds": time.perf_counter() - t0, "bench_peak_rss_at_spawn_mb": parent_peak,
                       **json.loads(result.stdout.strip().splitlines()[-1])}
                rows.append(row)
                print(f"depth {depth:3d} {row['mode']:>9}: peak RSS {row['peak_rss_mb']:8.1f} MB, refine "
                      f"{row['refine_seconds']:6.1f} s (process {row['process_seconds']:5.1f} s)", flush=True)
                import shutil

                shutil.rmtree(out, ignore_errors=True)
    slopes = {}
    for mode in ("stream", "in-memory"):
        sel = [r for r in rows if r["mode"] == mode]
        slopes[mode] = {
            "rss_mb_per_layer": slope([r["depth"] for r in sel], [r["peak_rss_mb"] for r in sel]),
            "ru_maxrss_mb_per_layer": slope([r["depth"] for r in sel], [r["ru_maxrss_mb"] for r in sel]),
            "seconds_per_layer": slope([r["depth"] for r in sel], [r["refine_seconds"] for r in sel]),
        }
    header = "| depth | stream peak RSS (MB) | stream refine (s) | in-memory peak RSS (MB) | in-memory refine (s) |"
    lines = [header, "|---|---|---|---|---|"]
    for depth in args.depths:
        s = next(r for r in rows if r["depth"] == depth and r["mode"] == "stream")
        m = next(r for r in rows if r["depth"] == depth and r["mode"] == "in-memory")
        lines.append(f"| {depth} | {s['peak_rss_mb']:.1f} | {s['refine_seconds']:.1f} | {m['peak_rss_mb']:.1f} | "
                     f"{m['refine_seconds']:.1f} |")
    lines.append(f"| **slope per layer** | **{slopes['stream']['rss_mb_per_layer']:.2f} MB** | "
                 f"{slopes['stream']['seconds_per_layer']:.2f} s | **{slopes['in-memory']['rss_mb_per_layer']:.2f} MB** | "
                 f"{slopes['in-memory']['seconds_per_layer']:.2f} s |")
    table = "\n".join(lines)
    ru_lines = [("| depth | this script's peak RSS when starting the child (MB) | stream `ru_maxrss` (MB) | "
                 "in-memory `ru_maxrss` (MB) |"), "|---|---|---|---|"]
    for depth in args.depths:
        s = next(r for r in rows if r["depth"] == depth and r["mode"] == "stream")
        m = next(r for r in rows if r["depth"] == depth and r["mode"] == "in-memory")
        ru_lines.append(f"| {depth} | {s['bench_peak_rss_at_spawn_mb']:.1f} | {s['ru_maxrss_mb']:.1f} | "
                        f"{m['ru_maxrss_mb']:.1f} |")
    ru_table = "\n".join(ru_lines)
    total = time.perf_counter() - t_all
    print()
    print(table)
    print(f"\none layer's float32 weights: {layer_mb:.2f} MB; whole bench {total:.0f} s")
    record = {
        "settings": {"depths": args.depths, "width": width, "nsamples": args.nsamples, "seqlen": args.seqlen,
                     "method": "wanda", "refinement": args.refine, "sparsity": 0.5, "dtype": "float32", "device": "cpu"},
        "layer_weights_mb": layer_mb, "rows": rows, "slopes": slopes, "bench_seconds": total,
        "machine": {"python": platform.python_version(), "platform": platform.platform()},
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "bench_memory.json").write_text(json.dumps(record, indent=2) + "\n")
    md = [
        "# Peak memory against depth: streaming vs in memory (`scripts/bench_memory.py`)",
        "",
        f"Random-weight Llama shapes, hidden {args.hidden}, intermediate {args.intermediate}, depth "
        f"{', '.join(map(str, args.depths))}; Wanda 50% + refinement `{args.refine}`, float32 on the CPU, calibration "
        f"{args.nsamples} x {args.seqlen} tokens. Each run is a fresh process; peak RSS is its own high-water "
        f"mark (`VmHWM` in /proc/self/status, read after `refine` returns). One layer's float32 weights: "
        f"{layer_mb:.2f} MB.",
        "",
        table,
        "",
        f"Slope of peak RSS against depth (least squares): streaming {slopes['stream']['rss_mb_per_layer']:.2f} MB per "
        f"layer, in memory {slopes['in-memory']['rss_mb_per_layer']:.2f} MB per layer. Whole bench {total:.0f} s on "
        "2 shared CPU cores (other jobs were running: times are indicative, RSS is not affected).",
        "",
        ("`ru_maxrss` of the same children, for comparison. Linux copies the peak RSS of the process that "
         "starts a child into the child's `ru_maxrss` at exec, so these are at least this script's own peak at "
         "that moment, which grows with depth because it builds each checkpoint in memory (slopes: streaming "
         f"{slopes['stream']['ru_maxrss_mb_per_layer']:.2f}, in memory "
         f"{slopes['in-memory']['ru_maxrss_mb_per_layer']:.2f} MB per layer):"),
        "",
        ru_table,
        "",
    ]
    (args.out_dir / "bench_memory.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
