"""Benchmark `dsnot-deploy export` on SmolLM2-135M (sparse) against llama.cpp's own converter.

For every type: wall time and peak RSS of the export (fresh process), file size, bits per weight,
pruned zeros kept, and llama.cpp perplexity (llama.cpp protocol: BOS rule, second half of each chunk
scored) on a fixed WikiText-2 test slice.  Then the same checkpoint converted by llama.cpp's
``convert_hf_to_gguf.py`` (run from the llama-cpp-python source distribution, never copied) at F16
and Q8_0: our time / its time, and whether the two files hold the same tensors (names, shapes,
types) and give the same logits.

    pip install -e ".[bench]"                      # sentencepiece, for llama.cpp's converter
    python scripts/bench_export.py                 # about 15-25 min on 2 cores
    python scripts/bench_export.py --types F16 Q8_0 --chunks 4

Writes docs/bench_export.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from converters.gguf_export import report_path  # noqa: E402
from dsnot_deploy.evaluation.llamacpp_runtime import logits_fn  # noqa: E402
from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
C4_TRAIN = DATA / "c4" / "en-train" / "c4_sample.jsonl"
WIKITEXT_TEST = DATA / "wikitext-2-raw-v1" / "wiki.test.raw"
DEFAULT_TYPES = ("F16", "Q8_0", "Q4_0", "Q4_K_M", "Q6_K", "SPARSE_Q5", "SPARSE_Q4", "SPARSE_Q3")
LLAMA_CPP_VERSION = "0.3.36"
PROMPT_IDS = [1, 504, 3458, 282, 4649, 314, 253, 1345, 28, 8640, 30, 378, 2366, 339, 2463, 19, 1392, 282, 16028]


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def make_checkpoint(work: Path, sparsity: str) -> Path:
    ckpt = work / f"smollm2-{sparsity.replace(':', '-')}"
    if (ckpt / "sparsity.json").is_file():
        return ckpt
    flag = ["--pattern", sparsity] if ":" in sparsity else ["--sparsity", sparsity]
    print(f"refining SmolLM2-135M ({sparsity}) into {ckpt} ...", flush=True)
    sh([sys.executable, "-m", "dsnot_deploy.cli", "refine", "smollm2-135m", str(ckpt), *flag,
        "--calib", str(C4_TRAIN) if C4_TRAIN.exists() else "pydoc",
        "--nsamples", "16", "--seqlen", "512", "-q", "--force"])
    return ckpt


def wikitext_ids(tokenizer) -> torch.Tensor:
    from dsnot_deploy.sources.textdata import load_text_source, tokenize_eval

    path = WIKITEXT_TEST
    source = load_text_source(str(path)) if path.exists() else load_text_source("pydoc")
    return tokenize_eval(tokenizer, source.eval_text("llamacpp"))


def llamacpp_ppl(path: Path, ids: torch.Tensor, n_ctx: int, chunks: int, bos: int | None) -> tuple[float, float]:
    from converters.llamacpp_loader import open_llama

    llm = open_llama(path, n_ctx=n_ctx, logits_all=True)
    try:
        result = perplexity_llamacpp(logits_fn(llm), ids, n_ctx, bos, max_chunks=chunks, progress=False)
        return result.ppl, result.tokens_per_second
    finally:
        llm.close()


def logits(path: Path, ids: list[int]) -> np.ndarray:
    from dsnot_deploy.evaluation.llamacpp_runtime import isolated_logits

    return isolated_logits(path, ids, n_ctx=64).astype(np.float64)


def tensor_table(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    import gguf

    return {t.name: (tuple(int(d) for d in t.shape), t.tensor_type.name) for t in gguf.GGUFReader(path).tensors}


def export(ckpt: Path, out: Path, qtype: str) -> dict:
    start = time.perf_counter()
    sh([sys.executable, "-m", "dsnot_deploy.cli", "export", str(ckpt), str(out), "--type", qtype, "--force", "-q",
        "--allow-zero-loss"])
    wall = time.perf_counter() - start
    report = json.loads(report_path(out).read_text())
    report["wall_seconds"] = wall
    return report


def upstream_converter(work: Path) -> Path:
    """convert_hf_to_gguf.py from the pinned llama-cpp-python sdist (downloaded by pip, extracted here)."""
    src = work / f"llama_cpp_python-{LLAMA_CPP_VERSION}"
    script = src / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    sh([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_CPP_VERSION}", "--no-deps",
        "--no-binary", ":all:", "-d", str(work)])
    with tarfile.open(work / f"llama_cpp_python-{LLAMA_CPP_VERSION}.tar.gz") as tar:
        tar.extractall(work, filter="data")
    return script


def run_upstream(script: Path, ckpt: Path, out: Path, outtype: str) -> float:
    start = time.perf_counter()
    sh([sys.executable, str(script), str(ckpt), "--outfile", str(out), "--outtype", outtype])
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_export"))
    ap.add_argument("--sparsity", default="0.5", help="refine setting of the checkpoint (0.5, 2:4, ...)")
    ap.add_argument("--types", nargs="+", default=list(DEFAULT_TYPES))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--no-upstream", action="store_true", help="skip the convert_hf_to_gguf.py comparison")
    ap.add_argument("--name", default="bench_export")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    ckpt = make_checkpoint(args.work, args.sparsity)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ids = wikitext_ids(tokenizer)
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None and int(ids[0]) == tokenizer.bos_token_id \
        else None
    rows = []
    for qtype in args.types:
        out = args.work / f"ours-{qtype}.gguf"
        report = export(ckpt, out, qtype)
        ppl, tps = llamacpp_ppl(out, ids, args.ctx, args.chunks, bos)
        row = {
            "type": qtype, "wall_s": report["wall_seconds"], "peak_rss_mib": report["peak_rss_mib"],
            "mib": report["file_bytes"] / 2**20, "bpw": report["bits_per_weight"],
            "zeros_kept_pct": 100 * report["zeros"]["kept_fraction"],
            "zeros_added": report["zeros"]["zeros_added_by_quantization"], "ppl": ppl, "tokens_per_s": tps,
            "tensor_types": report["tensor_types"],
        }
        rows.append(row)
        print(f"{qtype:10s} {row['wall_s']:6.1f} s {row['peak_rss_mib']:7.0f} MiB RSS {row['mib']:7.1f} MiB "
              f"{row['bpw']:5.2f} bpw zeros kept {row['zeros_kept_pct']:6.2f}% ppl {ppl:8.3f}", flush=True)

    upstream = []
    if not args.no_upstream:
        script = upstream_converter(args.work)
        for qtype, outtype in (("F16", "f16"), ("Q8_0", "q8_0")):
            ref = args.work / f"upstream-{qtype}.gguf"
            ours = args.work / f"ours-{qtype}.gguf"
            if not ours.exists():
                export(ckpt, ours, qtype)
            try:
                their_s = run_upstream(script, ckpt, ref, outtype)
            except subprocess.CalledProcessError as exc:
                print(f"upstream converter failed for {qtype}:\n{exc.stderr[-2000:]}", flush=True)
                upstream.append({"type": qtype, "error": exc.stderr[-500:]})
                continue
            our_s = export(ckpt, ours, qtype)["wall_seconds"]
            a, b = tensor_table(ours), tensor_table(ref)
            la, lb = logits(ours, PROMPT_IDS), logits(ref, PROMPT_IDS)
            entry = {
                "type": qtype, "ours_s": our_s, "upstream_s": their_s, "ratio": our_s / their_s,
                "same_names": sorted(a) == sorted(b),
                "same_shapes_and_types": a == b,
                "differences": sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))[:10],
                "logits_max_abs_diff": float(np.abs(la - lb).max()),
                "top1_agreement": float((la.argmax(-1) == lb.argmax(-1)).mean()),
                "ppl_upstream": llamacpp_ppl(ref, ids, args.ctx, args.chunks, bos)[0],
            }
            upstream.append(entry)
            print(f"upstream {qtype}: ours {our_s:.1f} s / theirs {their_s:.1f} s = {entry['ratio']:.2f}; same "
                  f"tensors (names, shapes, types): {entry['same_shapes_and_types']}; logits max |diff| "
                  f"{entry['logits_max_abs_diff']:.2e}, top-1 {entry['top1_agreement']:.3f}", flush=True)

    result = {"checkpoint": str(ckpt), "sparsity": args.sparsity, "ctx": args.ctx, "chunks": args.chunks,
              "text": "WikiText-2 raw test (llama.cpp protocol)", "rows": rows, "upstream": upstream}
    (ROOT / "docs" / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Export benchmark: SmolLM2-135M refined at {args.sparsity}",
        "",
        f"`python scripts/bench_export.py` on 2 CPU cores. Perplexity: llama.cpp protocol, {args.chunks} chunks of "
        f"{args.ctx} tokens of WikiText-2 test, computed in llama.cpp (llama-cpp-python {LLAMA_CPP_VERSION}).",
        "",
        "| type | time (s) | peak RSS (MiB) | size (MiB) | bits/weight | zeros kept | new zeros | ppl | tensor types |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        types = ", ".join(f"{k} x{v}" for k, v in sorted(r["tensor_types"].items()))
        lines.append(f"| {r['type']} | {r['wall_s']:.1f} | {r['peak_rss_mib']:.0f} | {r['mib']:.1f} | {r['bpw']:.2f} | "
                     f"{r['zeros_kept_pct']:.2f}% | {r['zeros_added']} | {r['ppl']:.3f} | {types} |")
    if upstream:
        lines += ["", "## Against llama.cpp's convert_hf_to_gguf.py", "",
                  "| type | ours (s) | upstream (s) | ours/upstream | same tensors | logits max diff | top-1 | "
                  "ppl upstream |", "|---|---|---|---|---|---|---|---|"]
        for u in upstream:
            if "error" in u:
                lines.append(f"| {u['type']} | converter failed: {u['error'].strip().splitlines()[-1]} |")
                continue
            lines.append(f"| {u['type']} | {u['ours_s']:.1f} | {u['upstream_s']:.1f} | {u['ratio']:.2f} | "
                         f"{u['same_shapes_and_types']} | {u['logits_max_abs_diff']:.2e} | {u['top1_agreement']:.3f} | "
                         f"{u['ppl_upstream']:.3f} |")
    (ROOT / "docs" / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
