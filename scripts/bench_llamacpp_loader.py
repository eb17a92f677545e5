#!/usr/bin/env python
"""What llama.cpp's extra buffer types cost or give, and whether both loaders agree (issue 12).

On SmolLM2-135M: a 50% Wanda checkpoint (16 x 512 calibration tokens, no weight update) exported
to each type, and the dense model exported to the same type; `validate` runs both files twice, with the extra buffer
types on (llama.cpp's default: AMX tiles where built, CPU_REPACK layouts on AVX2/AVX-512/NEON) and
off (the plain CPU buffer, what the loader uses on AMX CPUs with an AMX build). Per file and policy:
llama.cpp perplexity (llama.cpp protocol, WikiText-2 test), decode tokens/s; then the relative
perplexity difference between the two policies (target <= 1e-4) and the tokens/s ratio off / on.
The two policies alternate, best of ``--repeats`` for the speed, so both see the same machine load.

Writes docs/bench_llamacpp_loader.{md,json}. Example:
    python scripts/bench_llamacpp_loader.py --types F16 Q8_0 Q4_0 Q6_K SPARSE_Q4 --chunks 8
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.llamacpp_loader import (  # noqa: E402
    EXTRA_BUFTS_ENV,
    build_features,
    cpu_flags,
    cpu_has_amx,
    llamacpp_version,
    resolve_extra_buffers,
)
from dsnot_deploy.evaluation.validate import ValidateConfig, run_validation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_validate import exported  # noqa: E402  (the same cached export of a checkpoint)

SHARED = ROOT.parent / "shared" / "data"
log = logging.getLogger("bench_llamacpp_loader")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib", default=str(SHARED / "c4" / "en-train"), help="calibration text (default C4 train sample)")
    p.add_argument("--text", default=str(SHARED / "wikitext-2-raw-v1" / "wiki.test.raw"))
    p.add_argument("--types", nargs="+", default=["F16", "Q8_0", "Q4_0", "Q6_K", "SPARSE_Q4"])
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_llamacpp_loader"))
    p.add_argument("--out", type=Path, default=ROOT / "docs")
    return p


def machine_facts() -> dict:
    """This CPU (model, cores, the SIMD/AMX flags that matter) and the installed llama.cpp build."""
    flags = cpu_flags()
    return {
        "cpu": next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name")), platform.processor()),
        "cores": os.cpu_count(),
        "flags": sorted(f for f in flags if f.startswith(("amx", "avx512f", "avx512_vnni", "avx2", "avx_vnni"))),
        "cpu_amx": cpu_has_amx(flags),
        "llama_cpp_build": sorted(build_features()),
        "llamacpp": llamacpp_version(),
        "auto_policy": resolve_extra_buffers("auto").reason,
    }


def calibration_file(args: argparse.Namespace) -> str:
    path = Path(args.calib)
    if path.is_dir():  # the shared C4 sample is a folder of json.gz shards: take the first
        shards = sorted(p for p in path.iterdir() if p.is_file())
        return str(shards[0])
    return args.calib


def sparse_checkpoint(args: argparse.Namespace) -> Path:
    from dsnot_deploy.cli import main as cli_main

    out = args.work / "ckpt-wanda-50"
    if (out / "sparsity.json").is_file():
        return out
    code = cli_main(["refine", args.model, str(out), "--sparsity", "0.5", "--method", "wanda", "--refine", "none",
                     "--update", "none", "--nsamples", "16", "--seqlen", "512", "--calib", calibration_file(args), "-q"])
    if code != 0:
        raise SystemExit(f"refine failed with exit code {code}")
    return out


def measure(args: argparse.Namespace, sparse: Path, policy: str) -> dict:
    os.environ[EXTRA_BUFTS_ENV] = policy  # read by the loader in the llama.cpp child
    config = ValidateConfig(sparse=sparse, dense=args.model, text=args.text, ctx=args.ctx, max_chunks=args.chunks,
                            threads=args.threads, cache_dir=args.work / "dense-cache", progress=False)
    t0 = time.perf_counter()
    result, context = run_validation(config)
    return {"policy": policy, "sparse_ppl": result.sparse.ppl, "dense_ppl": result.dense.ppl,
            "sparse_tps": result.sparse.tokens_per_second, "dense_tps": result.dense.tokens_per_second,
            "kld": result.kld_mean, "top1": result.top1, "seconds": time.perf_counter() - t0,
            "dense_path": result.dense.path, "runtime": context["runtime"]}


def main() -> None:
    args = build_parser().parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    ckpt = sparse_checkpoint(args)
    machine = machine_facts()
    rows = []
    for qtype in args.types:
        sparse = exported(ckpt, qtype)
        runs: dict[str, list[dict]] = {"on": [], "off": []}
        for _ in range(args.repeats):
            for policy in ("on", "off"):
                runs[policy].append(measure(args, sparse, policy))
                log.info("%s %s: sparse ppl %.6f at %.1f tok/s", qtype, policy, runs[policy][-1]["sparse_ppl"],
                         runs[policy][-1]["sparse_tps"])
        on, off = runs["on"][0], runs["off"][0]
        best = {p: {k: max(r[k] for r in runs[p]) for k in ("sparse_tps", "dense_tps")} for p in runs}
        rows.append({
            "type": qtype, "sparse_gguf_mib": sparse.stat().st_size / 2**20,
            "sparse_ppl_on": on["sparse_ppl"], "sparse_ppl_off": off["sparse_ppl"],
            "dense_ppl_on": on["dense_ppl"], "dense_ppl_off": off["dense_ppl"],
            "sparse_rel_diff": abs(off["sparse_ppl"] / on["sparse_ppl"] - 1),
            "dense_rel_diff": abs(off["dense_ppl"] / on["dense_ppl"] - 1),
            "repeat_identical": all(r["sparse_ppl"] == runs[p][0]["sparse_ppl"] for p in runs for r in runs[p]),
            "sparse_tps_on": best["on"]["sparse_tps"], "sparse_tps_off": best["off"]["sparse_tps"],
            "dense_tps_on": best["on"]["dense_tps"], "dense_tps_off": best["off"]["dense_tps"],
            "runs": runs,
        })
    write(args, machine, rows)


def write(args: argparse.Namespace, machine: dict, rows: list[dict]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": machine, "settings": {k: str(v) for k, v in vars(args).items()}, "rows": rows}
    (args.out / "bench_llamacpp_loader.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# llama.cpp extra buffer types: on vs off (scripts/bench_llamacpp_loader.py)",
        "",
        f"Machine: {machine['cpu']}, {machine['cores']} cores; CPU flags {', '.join(machine['flags'])}; "
        f"AMX: {'yes' if machine['cpu_amx'] else 'no'}. {machine['llamacpp']}, built with "
        f"{', '.join(machine['llama_cpp_build'])}. `auto` here: {machine['auto_policy']} (on); the default "
        f"is off.",
        "",
        f"SmolLM2-135M, Wanda 50% (16 x 512 calibration tokens) and the dense model at the same type; "
        f"`validate`, llama.cpp protocol, {args.chunks} x {args.ctx} tokens of {Path(args.text).name}. "
        f"tok/s: decode tokens per second of that file, best of {args.repeats} alternated runs.",
        "",
        "| type | sparse MiB | sparse ppl on | sparse ppl off | rel. diff | dense ppl on | dense ppl off | rel. diff "
        "| sparse tok/s on | off | off/on | dense tok/s on | off | off/on |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['type']} | {r['sparse_gguf_mib']:.1f} | {r['sparse_ppl_on']:.4f} | {r['sparse_ppl_off']:.4f} | "
            f"{r['sparse_rel_diff']:.1e} | {r['dense_ppl_on']:.4f} | {r['dense_ppl_off']:.4f} | {r['dense_rel_diff']:.1e} | "
            f"{r['sparse_tps_on']:.0f} | {r['sparse_tps_off']:.0f} | {r['sparse_tps_off'] / r['sparse_tps_on']:.2f} | "
            f"{r['dense_tps_on']:.0f} | {r['dense_tps_off']:.0f} | {r['dense_tps_off'] / r['dense_tps_on']:.2f} |")
    worst = max(max(r["sparse_rel_diff"], r["dense_rel_diff"]) for r in rows)
    lines += ["", f"Largest relative perplexity difference between the policies: {worst:.2e} "
              f"(target <= 1e-4: {'met' if worst <= 1e-4 else 'NOT met'})."]
    (args.out / "bench_llamacpp_loader.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
