"""Export speed and peak memory at real widths: `dsnot-deploy export` vs llama.cpp's convert_hf_to_gguf.py.

Two checkpoints: SmolLM2-135M refined at 0.5 (float32, from scripts/bench_export.py's recipe, or
``--smollm2 DIR``), and a random Llama at Llama-3.2-1B width (hidden 2048, MLP 8192, 32 heads / 8 KV
heads, vocab 49152 with SmolLM2's tokenizer, untied output, bfloat16, 50% of every decoder weight set
to zero at random, in two safetensors shards).  For each checkpoint and type (F16, Q8_0) both
converters run as fresh child processes, alternating ours / upstream, ``--repeat`` times each; the
best wall time of each is compared, and each run's peak RSS (``os.wait4``'s ``ru_maxrss`` of the
child) is divided by the checkpoint's largest tensor.  The load average is sampled during every run
(the machine may be shared).  Our report's phase times (write, verification, tokenizer check) are
kept, and one more run with ``--no-verify`` shows what the verification costs.

    pip install -e ".[bench]"                 # sentencepiece, for llama.cpp's converter
    python scripts/bench_export_scale.py      # about 10-15 min on 2 cores (builds the 1B model once)
    python scripts/bench_export_scale.py --layers 4 --repeat 1   # quicker

Writes docs/bench_export_scale.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_export import make_checkpoint, upstream_converter

from converters.gguf_export import report_path

TYPES = (("F16", "f16"), ("Q8_0", "q8_0"))
WIDTH_1B = {"hidden_size": 2048, "intermediate_size": 8192, "num_attention_heads": 32, "num_key_value_heads": 8,
            "head_dim": 64, "vocab_size": 49152}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_random_llama(out: Path, tokenizer_dir: Path, layers: int, seed: int = 0, sparsity: float = 0.5) -> Path:
    """A Llama-3.2-1B-width random checkpoint (bf16, two shards, untied lm_head), with SmolLM2's tokenizer."""
    import torch
    from safetensors.torch import save_file

    if (out / "model.safetensors.index.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = WIDTH_1B
    h, f, v = w["hidden_size"], w["intermediate_size"], w["vocab_size"]
    kv = w["num_key_value_heads"] * w["head_dim"]
    gen = torch.Generator().manual_seed(seed)

    def weight(rows: int, cols: int, pruned: bool) -> torch.Tensor:
        t = torch.randn(rows, cols, generator=gen, dtype=torch.float32).mul_(0.02)
        if pruned:
            t.masked_fill_(torch.rand(rows, cols, generator=gen) < sparsity, 0.0)
        return t.to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{}, {}]
    shards[0]["model.embed_tokens.weight"] = weight(v, h, False)
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = shards[0 if i < layers // 2 else 1]
        for name, shape in (("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)),
                            ("self_attn.v_proj", (kv, h)), ("self_attn.o_proj", (h, h)),
                            ("mlp.gate_proj", (f, h)), ("mlp.up_proj", (f, h)), ("mlp.down_proj", (h, f))):
            shard[p + name + ".weight"] = weight(*shape, True)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            shard[p + norm + ".weight"] = (1 + 0.1 * torch.randn(h, generator=gen)).to(torch.bfloat16)
    shards[1]["model.norm.weight"] = torch.ones(h, dtype=torch.bfloat16)
    shards[1]["lm_head.weight"] = weight(v, h, False)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(tmp / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        **w, "num_hidden_layers": layers, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "torch_dtype": "bfloat16", "attention_bias": False, "mlp_bias": False, "initializer_range": 0.02,
        "_name_or_path": "random-llama-1b-width",
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, tmp / name)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def largest_tensor_bytes(ckpt: Path) -> tuple[str, int, int]:
    """(name, bytes as stored, elements) of the checkpoint's largest tensor."""
    from converters.hf_source import open_checkpoint

    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    c = open_checkpoint(ckpt)
    name, ref = max(c.tensors.items(), key=lambda kv: _numel(kv[1].shape))
    return name, _numel(ref.shape) * sizes.get(ref.dtype, 4), _numel(ref.shape)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class LoadSampler:
    """The 1-minute load average and the machine's busy CPU fraction, sampled every 0.5 s in a thread."""

    def __init__(self) -> None:
        self.loads: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.loads.append(os.getloadavg()[0])

    def __enter__(self):
        self.loads.append(os.getloadavg()[0])
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.loads.append(os.getloadavg()[0])

    def summary(self) -> dict[str, float]:
        return {"load_mean": sum(self.loads) / len(self.loads), "load_max": max(self.loads)}


def run_child(cmd: list[str]) -> dict:
    """Wall time, peak RSS (MiB) and CPU seconds of one child process, with the load average meanwhile."""
    with LoadSampler() as load:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # wait4 gives this child's own rusage (RUSAGE_CHILDREN would be the maximum over all children so far)
        out_err = {"stdout": "", "stderr": ""}

        def drain(stream, key):
            out_err[key] = stream.read()

        readers = [threading.Thread(target=drain, args=(proc.stdout, "stdout")),
                   threading.Thread(target=drain, args=(proc.stderr, "stderr"))]
        for r in readers:
            r.start()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        for r in readers:
            r.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out_err['stderr'][-3000:]}")
    return {"wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024, "cpu_s": usage.ru_utime + usage.ru_stime,
            **load.summary()}


def ours_cmd(ckpt: Path, out: Path, qtype: str, verify: bool = True) -> list[str]:
    cmd = [sys.executable, "-m", "dsnot_deploy.cli", "export", str(ckpt), str(out), "--type", qtype, "--force", "-q"]
    return cmd + ([] if verify else ["--no-verify"])


def upstream_cmd(script: Path, ckpt: Path, out: Path, outtype: str) -> list[str]:
    return [sys.executable, str(script), str(ckpt), "--outfile", str(out), "--outtype", outtype]


def python_baseline() -> dict:
    """Peak RSS of a bare interpreter that imports what export imports (numpy, torch, transformers, gguf)."""
    code = "import numpy, torch, gguf, transformers.models.auto.tokenization_auto, llama_cpp"
    return run_child([sys.executable, "-c", code])


def bench_checkpoint(label: str, ckpt: Path, work: Path, script: Path, repeat: int) -> dict:
    name, big_bytes, big_numel = largest_tensor_bytes(ckpt)
    rows = []
    for qtype, outtype in TYPES:
        ours_out, up_out = work / f"{label}-ours-{qtype}.gguf", work / f"{label}-up-{qtype}.gguf"
        ours, up = [], []
        for i in range(repeat):
            ours.append(run_child(ours_cmd(ckpt, ours_out, qtype)))
            ours[-1]["report_seconds"] = json.loads(report_path(ours_out).read_text())["seconds"]
            up.append(run_child(upstream_cmd(script, ckpt, up_out, outtype)))
            print(f"{label} {qtype} run {i + 1}: ours {ours[-1]['wall_s']:.1f} s {ours[-1]['peak_rss_mib']:.0f} MiB, "
                  f"upstream {up[-1]['wall_s']:.1f} s {up[-1]['peak_rss_mib']:.0f} MiB "
                  f"(load {ours[-1]['load_mean']:.2f} / {up[-1]['load_mean']:.2f})", flush=True)
        nv = run_child(ours_cmd(ckpt, work / f"{label}-ours-nv-{qtype}.gguf", qtype, verify=False))
        (work / f"{label}-ours-nv-{qtype}.gguf").unlink()
        best_ours, best_up = min(r["wall_s"] for r in ours), min(r["wall_s"] for r in up)
        rss_ours, rss_up = max(r["peak_rss_mib"] for r in ours), max(r["peak_rss_mib"] for r in up)
        same = _same_tensors(ours_out, up_out)
        rows.append({
            "type": qtype, "ours": ours, "upstream": up, "ours_no_verify": nv,
            "best_ours_s": best_ours, "best_upstream_s": best_up, "ratio": best_ours / best_up,
            "ratio_no_verify": nv["wall_s"] / best_up,
            "peak_rss_ours_mib": rss_ours, "peak_rss_upstream_mib": rss_up,
            "file_mib": ours_out.stat().st_size / 2**20,
            "same_tensor_data": same,
        })
        ours_out.unlink()
        up_out.unlink()
        print(f"{label} {qtype}: best ours {best_ours:.1f} s / upstream {best_up:.1f} s = {best_ours / best_up:.2f} "
              f"(no verify {nv['wall_s']:.1f} s); peak RSS ours {rss_ours:.0f} MiB, upstream {rss_up:.0f} MiB; "
              f"largest tensor {big_bytes / 2**20:.0f} MiB; same tensor data {same}", flush=True)
    return {"label": label, "checkpoint": str(ckpt), "largest_tensor": name,
            "largest_tensor_mib": big_bytes / 2**20, "largest_tensor_f32_mib": 4 * big_numel / 2**20, "rows": rows}


def _same_tensors(a: Path, b: Path) -> dict:
    """Do the two files hold the same tensors (names, shapes, types) with the same bytes?"""
    import hashlib

    from converters.gguf_read import read_gguf_layout

    la, lb = read_gguf_layout(a), read_gguf_layout(b)
    ta = {t.name: t for t in la.tensors}
    tb = {t.name: t for t in lb.tensors}
    table = sorted(ta) == sorted(tb) and all(
        (ta[n].dims, ta[n].type_id) == (tb[n].dims, tb[n].type_id) for n in ta)
    differ = []
    if table:
        with a.open("rb") as fa, b.open("rb") as fb:
            for n in sorted(ta):
                ha, hb = hashlib.sha1(), hashlib.sha1()
                for fh, t, hsh in ((fa, ta[n], ha), (fb, tb[n], hb)):
                    fh.seek(t.start)
                    left = t.nbytes or 0
                    while left:
                        chunk = fh.read(min(left, 64 << 20))
                        hsh.update(chunk)
                        left -= len(chunk)
                if ha.digest() != hb.digest():
                    differ.append(n)
    return {"same_table": table, "tensors": len(ta), "tensors_with_different_bytes": differ[:20],
            "n_different": len(differ)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/bench_export_scale"))
    ap.add_argument("--smollm2", type=Path, default=None, help="a refined SmolLM2 checkpoint (default: make one)")
    ap.add_argument("--layers", type=int, default=16, help="decoder layers of the 1B-width model (default 16)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each converter per type (best is kept)")
    ap.add_argument("--only", choices=("smollm2", "1b"), default=None)
    ap.add_argument("--name", default="bench_export_scale")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the .md from the .json and stop")
    args = ap.parse_args()
    if args.markdown_only:
        out = json.loads((ROOT / "docs" / f"{args.name}.json").read_text())
        (ROOT / "docs" / f"{args.name}.md").write_text(markdown(out))
        return
    args.work.mkdir(parents=True, exist_ok=True)
    script = upstream_converter(args.work)
    smol = args.smollm2 or make_checkpoint(args.work, "0.5")
    big = make_random_llama(args.work / f"llama-1b-width-{args.layers}l", smol, args.layers)
    base = python_baseline()
    print(f"import baseline (numpy, torch, gguf, transformers, llama_cpp): {base['peak_rss_mib']:.0f} MiB", flush=True)
    results = []
    for label, ckpt in (("smollm2", smol), ("1b", big)):
        if args.only in (None, label):
            results.append(bench_checkpoint(label, ckpt, args.work, script, args.repeat))
    manifest = json.loads((smol / "sparsity.json").read_text()) if (smol / "sparsity.json").is_file() else {}
    out = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "smollm2_sparsity": manifest.get("sparsity", {}).get("pruned_linears", 0.5), "layers_1b": args.layers,
           "repeat": args.repeat, "import_baseline": base, "results": results}
    (ROOT / "docs" / f"{args.name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (ROOT / "docs" / f"{args.name}.md").write_text(markdown(out))
    print(markdown(out))


def markdown(out: dict) -> str:
    base = out["import_baseline"]["peak_rss_mib"]
    lines = [
        "# Export at scale: `dsnot-deploy export` vs llama.cpp's convert_hf_to_gguf.py",
        "",
        (f"`python scripts/bench_export_scale.py` on {out['machine']['cpus']} CPU cores, shared with a background "
         f"job (load average sampled during every run). Each converter ran {out['repeat']}x per type, "
         "alternating ours / upstream, as a fresh process; times are the best run, peak RSS the worst "
         "(`ru_maxrss` of the child). Ours includes its verification (zeros, on-lattice counts, type check, "
         "file read-back, llama.cpp tokenizer check); the no-verify column is one run with `--no-verify`. "
         f"Import baseline (a Python that imports numpy, torch, gguf, transformers' tokenizers, llama_cpp): "
         f"{base:.0f} MiB."),
        "",
        (f"Checkpoints: `smollm2` = SmolLM2-135M refined at {out.get('smollm2_sparsity', 0.5):.2f} of its "
         "decoder Linears' weights pruned (float32 safetensors, tied embeddings); `1b` = a "
         f"random Llama at Llama-3.2-1B width (hidden 2048, MLP 8192, 32 / 8 heads, {out['layers_1b']} layers, "
         "vocab 49152, untied output, bfloat16 in two shards, half of every decoder weight zero). Same tensor "
         "bytes: both converters' files hold the same tensors (names, shapes, types) with identical bytes."),
        "",
        ("| model | type | ours (s) | upstream (s) | ours/upstream | no-verify (s) | no-verify/upstream | "
         "load (ours / upstream) | peak RSS ours (MiB) | upstream (MiB) | largest tensor (MiB) | "
         "(RSS - baseline) / largest | same tensor bytes |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for res in out["results"]:
        big = res["largest_tensor_mib"]
        for r in res["rows"]:
            lo = sum(x["load_mean"] for x in r["ours"]) / len(r["ours"])
            lu = sum(x["load_mean"] for x in r["upstream"]) / len(r["upstream"])
            same = r["same_tensor_data"]
            same_s = "yes" if same["same_table"] and not same["n_different"] else (
                f"{same['tensors'] - same['n_different']}/{same['tensors']}" if same["same_table"] else "table differs")
            lines.append(
                f"| {res['label']} | {r['type']} | {r['best_ours_s']:.1f} | {r['best_upstream_s']:.1f} | "
                f"{r['ratio']:.2f} | {r['ours_no_verify']['wall_s']:.1f} | {r['ratio_no_verify']:.2f} | "
                f"{lo:.2f} / {lu:.2f} | {r['peak_rss_ours_mib']:.0f} | {r['peak_rss_upstream_mib']:.0f} | {big:.0f} | "
                f"{(r['peak_rss_ours_mib'] - base) / big:.2f} | {same_s} |")
    lines += ["", ("CPU seconds (user + sys of the child, less sensitive to the shared machine than wall time), "
              "best run of each:"), ""]
    for res in out["results"]:
        for r in res["rows"]:
            co, cu = min(x["cpu_s"] for x in r["ours"]), min(x["cpu_s"] for x in r["upstream"])
            lines.append(f"- {res['label']} {r['type']}: ours {co:.1f} s, upstream {cu:.1f} s, ratio {co / cu:.2f}")
    lines += ["", (f"Targets (issue 16): export time / convert_hf_to_gguf.py time <= 1.0; peak RSS <= 2 x the largest "
              f"tensor (as stored) + a constant, the constant being the import baseline ({base:.0f} MiB):"), ""]
    for res in out["results"]:
        for r in res["rows"]:
            rss_ok = r["peak_rss_ours_mib"] <= 2 * res["largest_tensor_mib"] + base
            lines.append(f"- {res['label']} {r['type']}: time {r['ratio']:.2f} "
                         f"{'met' if r['ratio'] <= 1.0 else 'missed'}; RSS {r['peak_rss_ours_mib']:.0f} MiB vs bound "
                         f"{2 * res['largest_tensor_mib'] + base:.0f} MiB {'met' if rss_ok else 'missed'}")
    lines += ["", "Phase times of our best run (report `seconds`):", ""]
    for res in out["results"]:
        for r in res["rows"]:
            best = min(r["ours"], key=lambda x: x["wall_s"])
            phases = ", ".join(f"{k} {v:.2f}" for k, v in best["report_seconds"].items())
            lines.append(f"- {res['label']} {r['type']}: {phases}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
