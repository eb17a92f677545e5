"""Benchmark of the sparse pack on SmolLM2-135M: pack size vs zstd -19 / xz -9, entropy bounds, speed.

For each sparsity (50%, 70% unstructured, 2:4) the model is pruned with Wanda (`--refine none`:
the pack depends only on the weights' zero structure and values, and the refinement changes
neither the number of zeros per row nor the pattern), exported to F16, Q8_0 and Q4_0 GGUF, then:
- GGUF size, pack size, zstd level 19 (zstandard library, one thread) and xz -9 (lzma preset 9)
  of the same GGUF;
- pack bits per weight (pack bytes * 8 / all weights of the file);
- mask cost vs its entropy bound (sum over sparsely stored tensors of n * H(zero fraction) for
  unstructured masks, groups * H(pattern codes) for N:M), and the values stream vs the 0th-order
  entropy of the kept codes;
- pack and unpack throughput in MB of GGUF per second (unpack includes writing the file and the
  sha256/CRC checks; best of three runs).
Inputs are produced by subprocess and cached in --workdir (default /tmp/bench_pack); measured
numbers are cached per GGUF too (delete results.json there to re-measure).

    python scripts/bench_pack.py            # writes docs/bench_pack.md and docs/bench_pack.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters import pack_codecs as C
from converters.gguf_read import read_gguf_layout
from converters.sparse_pack import pack_gguf, size_breakdown, unpack

CONFIGS = {"50": ["--sparsity", "0.5"], "70": ["--sparsity", "0.7"], "2:4": ["--pattern", "2:4"]}
TYPES = ("F16", "Q8_0", "Q4_0")
MB = 1e6


def cli(*args: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    cmd = [sys.executable, "-m", "dsnot_deploy.cli", *args]
    print("+", " ".join(cmd[2:]), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def prepare(work: Path, label: str, qtype: str, nsamples: int, seqlen: int) -> Path:
    ckpt = work / f"ckpt-{label.replace(':', 'of')}"
    if not (ckpt / "sparsity.json").is_file():
        cli("refine", "smollm2-135m", str(ckpt), "--nsamples", str(nsamples), "--seqlen", str(seqlen),
            "--refine", "none", "--quiet", "--force", *CONFIGS[label])
    gguf_path = work / f"{label.replace(':', 'of')}-{qtype}.gguf"
    if not gguf_path.is_file():
        cli("export", str(ckpt), str(gguf_path), "--type", qtype, "--quiet", "--force")
    return gguf_path


def zstd19_size(path: Path) -> int:
    import zstandard

    return len(zstandard.ZstdCompressor(level=19).compress(path.read_bytes()))


def byte_entropy_bytes(path: Path) -> float:
    """0th-order entropy of the file's bytes, in bytes: what a static per-byte entropy coder reaches."""
    import numpy as np

    counts = np.bincount(np.fromfile(path, np.uint8), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(counts[counts > 0] * np.log2(p)).sum() / 8)


def xz9_size(path: Path) -> int:
    return len(lzma.compress(path.read_bytes(), preset=9))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def time_unpack(pk: Path, work: Path, gguf_path: Path) -> dict:
    """Best of three unpacks to a new file (wall and process CPU seconds); compares the restored file
    with the GGUF.  The previous run's output is deleted before each timed run, as a user unpacks to a
    path that does not exist yet."""
    restored = work / "restored.gguf"
    wall, cpu = [], []
    load = os.getloadavg()[0]
    for _ in range(3):
        restored.unlink(missing_ok=True)
        t0, c0 = time.perf_counter(), time.process_time()
        unpack(pk, restored)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    same = file_sha256(restored) == file_sha256(gguf_path)
    restored.unlink()
    return {"unpack_seconds": min(wall), "unpack_seconds_all": wall, "unpack_cpu_seconds": min(cpu),
            "byte_identical": same, "unpack_load_average_1min": load}


CTX_SCALE, CTX_COLUMN, CTX_ROW = 16, 16, 8  # buckets per context variable of the context-modelling bound


def _buckets(x, bins: int):
    """Quantile buckets 0..bins-1 of x (ties share a bucket)."""
    import numpy as np

    edges = np.quantile(x, np.linspace(0, 1, bins + 1)[1:-1])
    return np.searchsorted(edges, x, side="right").astype(np.int64)


def _cond_entropy_bits(ctx, sym) -> float:
    """Empirical entropy of `sym` given `ctx` (both non-negative int arrays), in bits."""
    import numpy as np

    joint = np.bincount(ctx * (int(sym.max()) + 1) + sym) if sym.size else np.zeros(1)
    marg = np.bincount(ctx) if ctx.size else np.zeros(1)
    j, m = joint[joint > 0], marg[marg > 0]
    return float(-(j * np.log2(j)).sum() + (m * np.log2(m)).sum())


def context_bound(gguf_path: Path, records: list[dict]) -> dict | None:
    """What a context-modelling coder could reach on the mask and kept-code streams (quantized types).

    Per sparsely stored tensor, with contexts a decoder knows before the stream (scales are decoded
    first, then the mask): the mask costs the smaller of its recorded bound and its entropy given
    the column (sum over columns of rows x H(column's zero fraction)); the kept codes cost their
    entropy given (block scale / row's median scale, half-octave buckets) x (column's kept
    fraction, quantile buckets) x (row's median scale, quantile buckets): CTX_SCALE x CTX_COLUMN x
    CTX_ROW contexts.  Empirical conditional entropies with the model's own cost left out, so this
    is optimistic for a coder using these contexts.  Each stream is counted at the smaller of its
    stored size and this bound (N:M pattern streams at their stored size).
    """
    import numpy as np

    from converters.pack_blocks import LAYOUTS

    sparse = {d["name"]: d for d in records if d["k"] == "tensor" and d.get("enc") == "sparse"}
    if not sparse or any(d["type"] not in ("Q8_0", "Q4_0") for d in sparse.values()):
        return None
    mask_stored = mask_ctx = values_stored = values_ctx = values_h0 = 0.0
    with open(gguf_path, "rb") as fh:
        for t in read_gguf_layout(gguf_path).tensors:
            d = sparse.get(t.name)
            if d is None:
                continue
            lay = LAYOUTS[t.type_name]
            fh.seek(t.start)
            side, codes = lay.split(np.frombuffer(fh.read(t.nbytes), np.uint8).reshape(-1, lay.block_bytes))
            row_len = t.dims[0]
            codes = codes.reshape(-1, row_len)
            zero = codes == lay.zero_code
            stored = {s[0]: s[2] * 8 for s in d["s"]}
            mask_stored += stored["mask"]
            values_stored += stored["values"]
            if d["mask"] == "nm":  # the pattern codes are counted as stored; the extra zeros ride in values
                kept = C.nm_encode(zero.reshape(-1), *d["nm"])[1].reshape(zero.shape)
                mask_ctx += stored["mask"]
            else:
                kept = ~zero
                rows = codes.shape[0]
                by_column = sum(C.binary_entropy_bits(int(k), rows) for k in kept.sum(axis=0))
                mask_ctx += min(stored["mask"], d["eb"][0], by_column)
            scale = np.abs(side[:, :2].copy().view(np.float16).reshape(codes.shape[0], -1).astype(np.float64))
            row_med = np.maximum(np.median(scale, axis=1, keepdims=True), 1e-30)
            rel = np.log2(np.maximum(scale, 1e-30) / row_med)
            sb = np.clip(np.floor(2 * rel + CTX_SCALE / 2), 0, CTX_SCALE - 1).astype(np.int64)
            ctx = (np.repeat(sb, lay.block_elems, axis=1) * CTX_COLUMN
                   + _buckets(kept.mean(axis=0), CTX_COLUMN)[None, :]) * CTX_ROW + _buckets(row_med[:, 0], CTX_ROW)[:, None]
            sym = codes[kept].astype(np.int64)
            values_ctx += min(stored["values"], _cond_entropy_bits(ctx[kept], sym))
            values_h0 += C.entropy_bits(sym)
    return {"mask_stored_bytes": mask_stored / 8, "mask_ctx_bytes": mask_ctx / 8,
            "values_stored_bytes": values_stored / 8, "values_ctx_bytes": values_ctx / 8,
            "values_h0_bytes": values_h0 / 8}


def measure(gguf_path: Path, work: Path) -> dict:
    layout = read_gguf_layout(gguf_path)
    n_weights = sum(t.n_elements for t in layout.tensors)
    pk = work / (gguf_path.stem + ".pack")
    load = os.getloadavg()[0]
    t0, c0 = time.perf_counter(), time.process_time()
    summary = pack_gguf(gguf_path, pk, force=True)
    pack_s, pack_cpu = time.perf_counter() - t0, time.process_time() - c0
    timing = time_unpack(pk, work, gguf_path)
    sparse = [d for d in summary.records if d["k"] == "tensor" and d.get("enc") == "sparse"]
    mask_bytes = sum(s[2] for d in sparse for s in d["s"] if s[0] == "mask")
    values_bytes = sum(s[2] for d in sparse for s in d["s"] if s[0] == "values")
    weights_sparse = sum(math.prod(d["dims"]) for d in sparse)
    kinds: dict[str, int] = {}
    for d in summary.records:
        if d["k"] == "tensor":
            key = d.get("enc") if d.get("enc") == "raw" else ("N:M" if d["mask"] == "nm" else d["mask"])
            kinds[key] = kinds.get(key, 0) + 1
    return {
        "gguf_bytes": summary.original_size, "pack_bytes": summary.pack_size, "pack_sha256": summary.sha256,
        "weights": n_weights, "weights_sparse": weights_sparse,
        "mask_bytes": mask_bytes, "mask_bound_bytes": sum(d["eb"][0] for d in sparse) / 8,
        "context_bound": context_bound(gguf_path, summary.records),
        "values_bytes": values_bytes, "values_entropy_bytes": sum(d["eb"][1] for d in sparse) / 8,
        "zeros_sparse": sum(d.get("zeros", 0) for d in sparse),
        "breakdown": size_breakdown(summary.records, summary.pack_size), "tensor_encodings": kinds,
        "pack_seconds": pack_s, "pack_cpu_seconds": pack_cpu, "load_average_1min": load, **timing,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_pack"))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    ap.add_argument("--types", nargs="+", default=list(TYPES))
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--no-xz", action="store_true", help="skip xz -9 (slow: about 1 MB/s)")
    ap.add_argument("--xz-rows", nargs="+", default=None, help="compute xz -9 only for these rows (e.g. 50/Q8_0)")
    ap.add_argument("--remeasure", action="store_true", help="measure the pack again (zstd/xz sizes stay cached)")
    ap.add_argument("--retime-unpack", action="store_true",
                    help="time unpack again on the cached packs (after a change to the unpacker)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_pack")
    args = ap.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    cache_path = work / "results.json"
    cache = {} if args.remeasure or not cache_path.is_file() else json.loads(cache_path.read_text())
    rows = []
    for label in args.configs:
        for qtype in args.types:
            g = prepare(work, label, qtype, args.nsamples, args.seqlen)
            key = f"{label}/{qtype}"
            mtime = g.stat().st_mtime
            entry = cache.get(key, {}) if cache.get(key, {}).get("gguf_mtime") == mtime else {}
            if args.remeasure or "pack_bytes" not in entry:
                print(f"measuring {key} ...", flush=True)
                entry.update(measure(g, work))
            elif args.retime_unpack:
                print(f"timing unpack of {key} ...", flush=True)
                entry.update(time_unpack(work / (g.stem + ".pack"), work, g))
            if "zstd19" not in entry:
                entry["zstd19"] = zstd19_size(g)
            if "gguf_h0_bytes" not in entry:
                entry["gguf_h0_bytes"] = byte_entropy_bytes(g)
            if entry.get("xz9") is None and not args.no_xz and (args.xz_rows is None or key in args.xz_rows):
                print(f"xz -9 of {g.name} ...", flush=True)
                entry["xz9"] = xz9_size(g)
            entry["gguf_mtime"] = mtime
            cache[key] = entry
            cache_path.write_text(json.dumps(cache, indent=1))
            rows.append({"config": label, "type": qtype, **cache[key]})
    text = report(rows, args)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".md").write_text(text + "\n")
    args.out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "rows": rows}, indent=1) + "\n")
    return 0


def machine() -> dict:
    import platform

    import zstandard

    return {"cpu_count": os.cpu_count(), "python": platform.python_version(), "zstandard": zstandard.__version__,
            "platform": platform.platform()}


def context_pack_bytes(r: dict) -> float | None:
    """The pack's size with mask and values at the context bound (None when not measured)."""
    cb = r.get("context_bound")
    if not cb:
        return None
    return (r["pack_bytes"] - cb["mask_stored_bytes"] - cb["values_stored_bytes"] + cb["mask_ctx_bytes"]
            + cb["values_ctx_bytes"])


def _ctx_ratio(r: dict) -> str:
    size = context_pack_bytes(r)
    return "-" if size is None else f"{size / r['zstd19']:.3f}"


def report(rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| sparsity | type | GGUF MB | pack MB | zstd-19 MB | xz-9 MB | GGUF H0 MB | pack / zstd-19 | pack bits/weight "
            "| mask / bound | values / entropy | context bound / zstd-19 | pack MB/s (CPU) | unpack MB/s (CPU) | load |")
    lines = [
        "# Sparse pack benchmark: SmolLM2-135M",
        "",
        (f"`python scripts/bench_pack.py` (work folder {args.workdir}). Checkpoints: Wanda, "
        f"`--refine none`, {args.nsamples} x {args.seqlen} calibration tokens. Packing depends only on the "
        "weights' zero structure and values, and refinement changes neither the zeros per row nor the "
        "pattern, so the unrefined masks give the same sizes a refined model would (up to the values)."),
        "Every pack was unpacked and compared: the restored GGUF is byte-identical (sha256) in every row.",
        "",
        "- pack bits/weight: pack bytes x 8 / all weights of the GGUF (embeddings and norms included).",
        ("- GGUF H0: the 0th-order entropy of the GGUF's bytes (a static per-byte entropy coder's bound); "
         "zstd -19 goes below it by also matching repeats; the pack goes below it by coding positions and kept "
         "codes apart and by zstd -19 on those streams."),
        ("- mask / bound: stored mask streams over the 0th-order entropy bound of what they encode, summed over "
         "the tensors stored sparsely (docs/pack-format.md, `eb`): for a bitmask or gaps, where every zero is (the "
         "smaller of n H(zero fraction) and the entropy of the 4- and 8-weight group symbols, which sees N:M "
         "structure and the extra zeros of quantization); for N:M pattern codes, groups x H(pattern code)."),
        "- values / entropy: stored kept-code streams over the 0th-order entropy of those codes.",
        ("- context bound / zstd-19 (quantized types): the pack with its mask and kept-code streams replaced by "
         "what a context-modelling coder could reach at best: the mask's entropy given its column, the kept codes' "
         "entropy given (block scale relative to the row) x (column's kept fraction) x (row's scale), "
         f"{CTX_SCALE} x {CTX_COLUMN} x {CTX_ROW} contexts, model cost left out (optimistic); each stream "
         "counted at the smaller of its stored size and that bound. It says how much any coder of this kind "
         "could still gain over the pack."),
        ("- throughput: MB of GGUF per second of wall-clock time (best of three unpacks), and in brackets per CPU "
        "second of the process (user + system, all its threads: load-independent; the unpacker decodes two "
        "records in worker threads while the main thread hashes and writes the oldest, so it can use every core "
        "this machine has: 2). Unpack writes the file (fsync included) and checks CRC-32s and the sha256. `load` is "
        "the 1-minute load average just before the unpacks were timed."),
        "",
        head,
        "|" + "|".join("---" for _ in range(15)) + "|",
    ]
    for r in rows:
        xz = f"{r['xz9'] / MB:.1f}" if r.get("xz9") else "-"
        lines.append(
            f"| {r['config']}{'%' if r['config'] != '2:4' else ''} | {r['type']} | {r['gguf_bytes'] / MB:.1f} "
            f"| {r['pack_bytes'] / MB:.1f} | {r['zstd19'] / MB:.1f} | {xz} | {r['gguf_h0_bytes'] / MB:.1f} "
            f"| {r['pack_bytes'] / r['zstd19']:.3f} "
            f"| {r['pack_bytes'] * 8 / r['weights']:.3f} | {r['mask_bytes'] / max(r['mask_bound_bytes'], 1):.4f} "
            f"| {r['values_bytes'] / max(r['values_entropy_bytes'], 1):.4f} | {_ctx_ratio(r)} "
            f"| {r['gguf_bytes'] / MB / r['pack_seconds']:.1f} ({r['gguf_bytes'] / MB / r['pack_cpu_seconds']:.1f}) "
            f"| {r['gguf_bytes'] / MB / r['unpack_seconds']:.1f} ({r['gguf_bytes'] / MB / r['unpack_cpu_seconds']:.1f}) "
            f"| {r.get('unpack_load_average_1min', r['load_average_1min']):.1f} |")
    lines += ["", "Size breakdown of each pack (MB):", "",
              "| sparsity | type | metadata | raw tensors | scales | mask | values | overhead | encodings |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        b = r["breakdown"]
        enc = ", ".join(f"{v} {k}" for k, v in sorted(r["tensor_encodings"].items()))
        lines.append(f"| {r['config']} | {r['type']} | {b['metadata'] / MB:.2f} | {b['raw'] / MB:.2f} "
                     f"| {b['side'] / MB:.2f} | {b['mask'] / MB:.2f} | {b['values'] / MB:.2f} "
                     f"| {b['overhead'] / MB:.3f} | {enc} |")
    lines += ["", "Targets:"]
    q8 = [r for r in rows if r["config"] == "50" and r["type"] == "Q8_0"]
    if q8:
        ratio = q8[0]["pack_bytes"] / q8[0]["zstd19"]
        lines.append(f"- pack <= 0.8x zstd-19 at 50% Q8_0: {ratio:.3f}x -> {'met' if ratio <= 0.8 else 'NOT met'}")
        ctx = context_pack_bytes(q8[0])
        if ctx is not None:
            lines.append(f"  (with mask and kept codes at the context-modelling bound it would be {ctx / q8[0]['zstd19']:.3f}x: "
                         f"{(q8[0]['pack_bytes'] - ctx) / MB:.2f} MB to gain of the {(q8[0]['pack_bytes'] - 0.8 * q8[0]['zstd19']) / MB:.2f} MB "
                         "the target needs)")
        r = q8[0]
        kept = r["weights_sparse"] - r["zeros_sparse"]
        lines.append(
            f"  Why: the kept Q8_0 codes carry {r['values_entropy_bytes'] * 8 / kept:.2f} bits each at their 0th-order "
            f"entropy (of 8: they are the noisy high-order digits of the weights), the mask "
            f"{r['mask_bound_bytes'] * 8 / r['weights_sparse']:.3f} bits per weight. zstd -19 on the GGUF bytes already "
            "codes the zero code in about one bit (its Huffman literal coder sees half the bytes are 0x00), so "
            "coding positions and values apart gains only what zstd loses to its byte-wise modelling; the context "
            "bound above says what conditioning on scale, column and row could add. The test model's weights "
            "sit on a Q4_1 lattice (it ships as Q4_1); docs/bench_pack_lattice.md measures the pack off it.")
    worst_mask = max(r["mask_bytes"] / max(r["mask_bound_bytes"], 1) for r in rows)
    lines.append(f"- mask within 5% of its entropy bound: worst {worst_mask:.4f}x -> "
                 f"{'met' if worst_mask <= 1.05 else 'NOT met'}")
    slowest = min(r["gguf_bytes"] / MB / r["unpack_seconds"] for r in rows)
    slowest_cpu = min(r["gguf_bytes"] / MB / r["unpack_cpu_seconds"] for r in rows)
    lines.append(f"- unpack >= 200 MB/s on this machine (wall clock, 2 cores): slowest {slowest:.1f} MB/s -> "
                 f"{'met' if slowest >= 200 else 'NOT met'}. Per CPU second (what one core would give) the slowest "
                 f"row is {slowest_cpu:.1f} MB/s{'' if slowest_cpu >= 200 else ': a single-core device would be below 200'}.")
    if not all(r["byte_identical"] for r in rows):
        lines.append("- WARNING: a restored GGUF differs from its input")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
