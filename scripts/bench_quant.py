"""Quantization onto GGUF lattices (issue 15): round-to-nearest, llama.cpp's imatrix quantizer, and ours.

For each model *state* (``dense``; ``offgrid``, the dense model moved off the Q4_1 lattice it ships
on, see ``offgrid_checkpoint``; or a sparsity refined with the default pipeline: ``0.3``, ``0.5``,
``2:4``) and each type (Q8_0, Q5_0, Q4_0), these files are written and scored in llama.cpp:

- ``rtn``: `export --type T` of the state's checkpoint (ggml's round-to-nearest, gguf-py's reference
  quantizer, no importance matrix): what users get today;
- ``imatrix``: the state's F16 GGUF through llama.cpp's own quantizer with an importance matrix
  (mean x^2 per input channel of every decoder Linear, measured on the calibration windows through
  the state's own model), every tensor of type T (``pure``), as `llama-quantize --imatrix` would;
- ``gptq``: the state's checkpoint quantized onto T's lattice by ``dsnot_deploy.quant`` (a
  quantization-only pass, each layer calibrated on the quantized prefix), then `export --type T`; the
  row records how many tensors ggml wrote with no second rounding ("on lattice").
- ``rtn+e8``, ``imatrix+e8``, ``gptq+e8``: the same files with the tied token embedding (every other
  tensor unchanged) at Q8_0 instead of T; the first two written by llama.cpp's quantizer from an F32
  GGUF, ``gptq+e8`` by `export --type T --embedding-type Q8_0` (which writes on-lattice blocks at any
  scale exactly, so its decoder weights are ``gptq``'s); the difference to the plain row is the
  embedding's share of the loss.
- The sparsity-safe presets (``SPARSE_Q4``, ``SPARSE_Q5``; written by llama.cpp from our per-tensor
  plan): ``rtn`` = `export --type T` with no importance matrix, ``imatrix`` = with the state's
  statistics (`export --imatrix`, what a refined checkpoint gets by default), ``gptq`` = the state
  quantized onto the preset's per-tensor lattices (``quant.targets``), exported with the same
  statistics for the tensors left to llama.cpp (Q6_K).

Perplexity: llama.cpp protocol (BOS first, second half of each chunk scored), ``--ctx`` tokens per
chunk, on every ``--texts`` entry; each relative to the same state in F16.  Settings are chosen on
``wiki-valid`` and reported on ``wiki-test``.  Rows are cached in docs/NAME.rows.jsonl (resumable);
the report is rewritten after every row.

    python scripts/bench_quant.py --states dense 0.5 --types Q4_0 --methods rtn imatrix gptq
    python scripts/bench_quant.py --gptq-settings d0.01 d0.01,s0.8 --texts wiki-valid   # tuning
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from dsnot_deploy.quant.gptq import QuantizeConfig  # noqa: E402
from dsnot_deploy.quant.targets import PRESETS, TARGETS  # noqa: E402

DATA = ROOT.parent / "shared" / "data"
C4_TRAIN = DATA / "c4" / "en-train" / "c4_sample.jsonl"
TEXTS = {"wiki-valid": DATA / "wikitext-2-raw-v1" / "wiki.valid.raw",
         "wiki-test": DATA / "wikitext-2-raw-v1" / "wiki.test.raw"}
LLAMA_CPP_VERSION = "0.3.36"


def parse_settings(text: str) -> dict[str, Any]:
    """``d0.1,s0.8,a0.3,n16x512[,search][,head]``: damping, smallest scale shrink (candidates 1.0 down to
    it in 0.05 steps), the sweep's shrink of H toward its diagonal, calibration windows, ``search`` for
    searched free block scales (QuantizeConfig.scales) and ``head`` to sweep the output head too
    (QuantizeConfig.head); missing parts take the values shown (``anchor`` scales, no head)."""
    out: dict[str, Any] = {"damping": 0.1, "min_shrink": 0.8, "alpha": 0.3, "nsamples": 16, "seqlen": 512,
                           "scales": "anchor", "head": False}
    for part in filter(None, text.split(",")):
        if part == "search":
            out["scales"] = "search"
        elif part == "head":
            out["head"] = True
        elif part[0] == "d":
            out["damping"] = float(part[1:])
        elif part[0] == "s":
            out["min_shrink"] = float(part[1:])
        elif part[0] == "a":
            out["alpha"] = float(part[1:])
        elif part[0] == "n":
            n, length = part[1:].split("x")
            out["nsamples"], out["seqlen"] = int(n), int(length)
        else:
            raise SystemExit(f"unknown gptq setting {part!r} in {text!r}")
    return out


def shrinks(min_shrink: float) -> tuple[float, ...]:
    steps = int(round((1.0 - min_shrink) / 0.05))
    return tuple(round(1.0 - 0.05 * i, 4) for i in range(steps + 1))


def state_checkpoint(work: Path, state: str, model: str, calib: tuple[int, int]) -> Path:
    """The state's HF checkpoint: the dense model saved as is, or `refine` with the default pipeline."""
    ckpt = work / f"state-{state.replace(':', '-')}"
    if (ckpt / "config.json").is_file():
        return ckpt
    if state == "dense":
        from dsnot_deploy.sources.checkpoint_io import save_checkpoint
        from dsnot_deploy.sources.models import load_model

        loaded = load_model(model, dtype=torch.float32)
        save_checkpoint(loaded.model, loaded.tokenizer, ckpt)
        return ckpt
    if state == "offgrid":
        return offgrid_checkpoint(state_checkpoint(work, "dense", model, calib), ckpt)
    flag = ["--pattern", state] if ":" in state else ["--sparsity", state]
    print(f"refining {model} ({state}, default pipeline) into {ckpt} ...", flush=True)
    subprocess.run([sys.executable, "-m", "dsnot_deploy.cli", "refine", model, str(ckpt), *flag, "--calib",
                    str(C4_TRAIN), "--nsamples", str(calib[0]), "--seqlen", str(calib[1]), "-q"], check=True)
    return ckpt


def offgrid_checkpoint(src: Path, dst: Path, seed: int = 0) -> Path:
    """The dense checkpoint with every 2-D weight of whole 32-blocks (decoder Linears and the embedding)
    moved within its own cell of the Q4_1 lattice the offline model ships on (bench_pack_lattice's
    jitter), as a bf16 model's weights would look; zeros stay zero."""
    from bench_pack_lattice import jitter_checkpoint

    tmp = dst.with_name(dst.name + ".tmp")
    jitter_checkpoint(src, tmp, seed, include=lambda name, w: w.ndim == 2 and w.shape[1] % 32 == 0)
    tmp.rename(dst)
    return dst


def calibration_windows(tokenizer: Any, nsamples: int, seqlen: int) -> torch.Tensor:
    from dsnot_deploy.sources.textdata import load_text_source, sample_calibration

    docs = load_text_source(str(C4_TRAIN)).documents
    return sample_calibration(tokenizer, list(docs), nsamples, seqlen, 0)


def gptq_checkpoint(work: Path, ckpt: Path, qtype: str, settings: dict[str, Any]) -> tuple[Path, dict[str, Any]]:
    """``ckpt`` quantized onto ``qtype``'s lattice by a quantization-only pass; (folder, its record)."""
    from dsnot_deploy.layerwise.driver import DriverConfig, run_layers
    from dsnot_deploy.quant.head import quantize_head
    from dsnot_deploy.quant.record import quantize_record
    from dsnot_deploy.sources.checkpoint_io import save_checkpoint
    from dsnot_deploy.sources.models import find_decoder_layers, load_model

    tag = (f"d{settings['damping']}-s{settings['min_shrink']}-a{settings['alpha']}-n{settings['nsamples']}x"
           f"{settings['seqlen']}" + ("-search" if settings["scales"] == "search" else "")
           + ("-head" if settings["head"] else ""))
    out = work / f"{ckpt.name}-gptq-{qtype}-{tag}"
    record_file = out / "quantize.json"
    if record_file.is_file():
        return out, json.loads(record_file.read_text())
    loaded = load_model(str(ckpt), dtype=torch.float32)
    samples = calibration_windows(loaded.tokenizer, settings["nsamples"], settings["seqlen"])
    config = QuantizeConfig(type=qtype, damping=settings["damping"], shrinks=shrinks(settings["min_shrink"]),
                            diag_shrink=settings["alpha"], scales=settings["scales"], head=settings["head"])
    layers_path, layers = find_decoder_layers(loaded.model)
    result = run_layers(loaded.model, layers, samples, DriverConfig(prune=None, quantize=config, progress=False))
    head = quantize_head(loaded.model, layers_path, result.hidden, config)
    record = quantize_record(config, result, head)["quantize"]
    source = ckpt / "sparsity.json"
    extra = {"quantize.json": json.dumps({k: v for k, v in record.items() if k != "linears"}).encode()}
    # the manifest's quantize record is what tells `export` to keep on-lattice blocks at their own scales
    manifest = (json.loads(source.read_text()) if source.is_file() else {}) | {"quantize": record}
    save_checkpoint(loaded.model, loaded.tokenizer, out, extra_files=extra, force=True,
                    manifest_name="sparsity.json", manifest=json.dumps(manifest, indent=1).encode())
    return out, record


def importance(ckpt: Path, nsamples: int, seqlen: int, head: bool = False) -> dict[str, np.ndarray]:
    """GGUF weight name -> mean x^2 per input channel of each decoder Linear (and with ``head`` of the
    output head, under the tied embedding's name when tied), through ``ckpt``'s model."""
    import gguf

    from converters.imatrix import imatrix_from_stats

    stats = importance_stats(ckpt, nsamples, seqlen, head)
    n_layers = 1 + max(int(k.split(".layers.")[1].split(".")[0]) for k in stats if ".layers." in k)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)
    out = imatrix_from_stats({k: v for k, v in stats.items() if k != "lm_head"},
                             lambda name: tmap.get_name(name, try_suffixes=(".weight",)))
    if "lm_head" in stats:
        config = json.loads((ckpt / "config.json").read_text())
        out["token_embd.weight" if config.get("tie_word_embeddings", True) else "output.weight"] = stats["lm_head"]
    return out


def importance_file(work: Path, ckpt: Path, nsamples: int, seqlen: int) -> Path:
    """The same statistics as `refine`'s calibration_stats.safetensors (HF module name -> mean x^2), for
    `export --imatrix FILE` of the preset types."""
    from safetensors.numpy import save_file

    out = work / f"{ckpt.name}-stats-n{nsamples}x{seqlen}.safetensors"
    if not out.is_file():
        save_file(importance_stats(ckpt, nsamples, seqlen), out)
    return out


def importance_stats(ckpt: Path, nsamples: int, seqlen: int, head: bool = False) -> dict[str, np.ndarray]:
    """HF module name -> mean x^2 per input channel of each decoder Linear (and ``lm_head``), through
    ``ckpt``'s model."""
    from dsnot_deploy.sources.models import find_decoder_layers, load_model

    loaded = load_model(str(ckpt), dtype=torch.float32)
    model = loaded.model
    path, layers = find_decoder_layers(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for i, layer in enumerate(layers):
        for name, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                key = f"{path}.{i}.{name}"

                def hook(m, args, out, key=key) -> None:
                    x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
                    sums[key] = sums.get(key, 0) + (x * x).sum(0)
                    counts[key] = counts.get(key, 0) + x.shape[0]
                hooks.append(mod.register_forward_hook(hook))
    if head:
        def head_hook(m, args, out) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums["lm_head"] = sums.get("lm_head", 0) + (x * x).sum(0)
            counts["lm_head"] = counts.get("lm_head", 0) + x.shape[0]
        hooks.append(model.get_output_embeddings().register_forward_hook(head_hook))
    samples = calibration_windows(loaded.tokenizer, nsamples, seqlen)
    with torch.no_grad():
        for row in samples:
            model(row.unsqueeze(0))
    for h in hooks:
        h.remove()
    return {key: (total / counts[key]).numpy().astype(np.float32) for key, total in sums.items()}


def export(ckpt: Path, out: Path, qtype: str, embedding: str | None = None, imatrix: str = "none") -> dict[str, Any]:
    """`export --type qtype [--embedding-type E] [--imatrix FILE]`; its size and, from the export report,
    how many decoder weights came back bit for bit ("on lattice")."""
    from converters.gguf_export import ExportConfig, export_gguf, report_path

    if not out.is_file():
        export_gguf(ckpt, out, ExportConfig(qtype=qtype, progress=False, imatrix=imatrix, embedding_type=embedding))
    zeros = json.loads(report_path(out).read_text())["zeros"]
    exact = zeros.get("tensors_written_exactly")
    return {"bytes": out.stat().st_size, **({"on_lattice": [exact, zeros["tensors"]]} if exact is not None else {})}


def preset_arm(args: argparse.Namespace, ckpt: Path, qtype: str, method: str, settings: str,
               im_calib: tuple[int, ...]) -> dict[str, Any]:
    """A sparsity-safe preset (llama.cpp writes it from our per-tensor plan): ``rtn`` = `export --type T`
    without an importance matrix, ``imatrix`` = with the state's statistics (what `export` does for a
    refined checkpoint), ``gptq`` = the checkpoint quantized onto the preset's per-tensor lattices, then
    `export --type T` with the same statistics for the tensors left to llama.cpp (Q6_K)."""
    if method.endswith("+e8"):
        raise SystemExit(f"{method} does not apply to {qtype} (its embedding is Q8_0 already)")
    if method == "rtn":
        path = args.work / f"{ckpt.name}-{qtype}-rtn.gguf"
        return {"path": str(path), **export(ckpt, path, qtype)}
    stats = str(importance_file(args.work, ckpt, *im_calib))
    if method == "imatrix":
        path = args.work / f"{ckpt.name}-{qtype}-imatrix-{settings}.gguf"
        return {"path": str(path), **export(ckpt, path, qtype, imatrix=stats)}
    qckpt, record = gptq_checkpoint(args.work, ckpt, qtype, parse_settings(settings))
    path = args.work / f"{qckpt.name}.gguf"
    return {"path": str(path), **export(qckpt, path, qtype, imatrix=stats),
            "quantize": {k: record[k] for k in ("linears_quantized", "linears_gptq", "mean_relative_error_rtn",
                                                "mean_relative_error", "zeros_added", "seconds")}}


def llamacpp_imatrix(f16: Path, out: Path, qtype: str, imatrix: dict[str, np.ndarray]) -> dict[str, Any]:
    from gguf import LlamaFileType

    from converters.llamacpp_quantize import llamacpp_quantize

    if not out.is_file():
        tmp = out.with_suffix(".tmp.gguf")
        llamacpp_quantize(f16, tmp, int(getattr(LlamaFileType, f"MOSTLY_{qtype}")), imatrix=imatrix, pure=True)
        tmp.rename(out)
    return {"bytes": out.stat().st_size}


def embedding_at_q8(src_ckpt: Path, out: Path, qtype: str, imatrix: dict[str, np.ndarray] | None) -> dict[str, Any]:
    """``src_ckpt`` as an F32 GGUF, then llama.cpp's quantizer: every tensor ``qtype`` (pure) but the
    token embedding (and an untied output) at Q8_0; ``imatrix`` only for the imatrix arm."""
    from gguf import GGMLQuantizationType, LlamaFileType

    from converters.llamacpp_quantize import llamacpp_quantize

    if not out.is_file():
        f32 = out.with_suffix(".f32.gguf")
        export(src_ckpt, f32, "F32")
        tmp = out.with_suffix(".tmp.gguf")
        keep = ((r"^token_embd\.weight$", GGMLQuantizationType.Q8_0), (r"^output\.weight$", GGMLQuantizationType.Q8_0))
        llamacpp_quantize(f32, tmp, int(getattr(LlamaFileType, f"MOSTLY_{qtype}")), imatrix=imatrix, pure=True,
                          overrides=keep)
        tmp.rename(out)
        f32.unlink()
    return {"bytes": out.stat().st_size}


def perplexities(path: Path, texts: list[str], ctx: int, chunks: int, tokenizer: Any) -> dict[str, float]:
    from converters.llamacpp_loader import open_llama
    from dsnot_deploy.evaluation.llamacpp_runtime import logits_fn
    from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp
    from dsnot_deploy.sources.textdata import load_text_source, tokenize_eval

    out = {}
    llm = open_llama(path, n_ctx=ctx, logits_all=True)
    try:
        for name in texts:
            ids = tokenize_eval(tokenizer, load_text_source(str(TEXTS[name])).eval_text("llamacpp"))
            bos = tokenizer.bos_token_id
            res = perplexity_llamacpp(logits_fn(llm), ids, ctx, bos, max_chunks=chunks, progress=False)
            out[f"ppl:{name}"] = res.ppl
    finally:
        llm.close()
    return out


def write_report(rows: list[dict[str, Any]], name: str, args: argparse.Namespace) -> None:
    f16 = {r["state"]: r for r in rows if r["method"] == "f16"}
    lines = [f"# {name}: GPTQ onto GGUF lattices vs round-to-nearest and llama.cpp's imatrix quantizer", "",
             f"Model {args.model}; llama.cpp {LLAMA_CPP_VERSION} protocol, ctx {args.ctx}, {args.chunks} chunks; "
             f"ratios are ppl / the same state's F16 ppl. Command: `python scripts/bench_quant.py "
             f"{' '.join(sys.argv[1:])}`", ""]
    for text in args.texts:
        lines += [f"## {text}", "", "| state | type | method | settings | MiB | ppl | ratio to F16 | on lattice |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rows:
            key = f"ppl:{text}"
            if key not in r:
                continue
            base = f16.get(r["state"], {}).get(key)
            ratio = f"{r[key] / base:.4f}" if base else "-"
            lat = f"{r['on_lattice'][0]} of {r['on_lattice'][1]}" if "on_lattice" in r else ""
            lines.append(f"| {r['state']} | {r['type']} | {r['method']} | {r.get('settings', '')} | "
                         f"{r['bytes'] / 2**20:.1f} | {r[key]:.3f} | {ratio} | {lat} |")
        lines.append("")
    out = ROOT / "docs" / f"{name}.md"
    out.write_text("\n".join(lines) + "\n")
    (ROOT / "docs" / f"{name}.json").write_text(json.dumps({"args": vars(args) | {"work": str(args.work)},
                                                            "rows": rows}, indent=1, default=str) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--states", nargs="+", default=["dense", "0.3", "0.5", "2:4"])
    p.add_argument("--types", nargs="+", default=["Q8_0", "Q5_0", "Q4_0"], choices=sorted(TARGETS))
    p.add_argument("--methods", nargs="+", default=["rtn", "imatrix", "gptq"], choices=["rtn", "imatrix", "gptq", "rtn+e8", "imatrix+e8", "gptq+e8"])
    p.add_argument("--gptq-settings", nargs="+", default=["d0.1,s0.8,a0.7,search"],
                   help="each: d<damping>,s<min shrink>,n<N>x<L> (see parse_settings)")
    p.add_argument("--refine-calib", default="16x512", help="calibration of the sparse states' refine")
    p.add_argument("--imatrix-calib", default="16x512")
    p.add_argument("--imatrix-head", action="store_true",
                   help="imatrix arms: the output head's statistics too (the tied embedding's importance)")
    p.add_argument("--texts", nargs="+", default=["wiki-valid", "wiki-test"], choices=sorted(TEXTS))
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--chunks", type=int, default=16)
    p.add_argument("--work", type=Path, default=Path("/tmp/bench_quant"))
    p.add_argument("--name", default="bench_quant")
    args = p.parse_args()
    from transformers import AutoTokenizer

    args.work.mkdir(parents=True, exist_ok=True)
    cache = ROOT / "docs" / f"{args.name}.rows.jsonl"
    rows = [json.loads(line) for line in cache.read_text().splitlines()] if cache.is_file() else []
    done = {r["key"] for r in rows}
    refine_calib = tuple(int(v) for v in args.refine_calib.split("x"))
    im_calib = tuple(int(v) for v in args.imatrix_calib.split("x"))

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        with cache.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        write_report(rows, args.name, args)
        print(json.dumps({k: v for k, v in row.items() if k != "key"}), flush=True)

    for state in args.states:
        ckpt = state_checkpoint(args.work, state, args.model, refine_calib)  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(ckpt)
        f16 = args.work / f"{ckpt.name}-F16.gguf"
        jobs: list[tuple[str, str, str]] = [("F16", "f16", "")]
        for qtype in args.types:
            for method in args.methods:
                for s in (args.gptq_settings if method.startswith("gptq") else [""]):
                    jobs.append((qtype, method, s if method.startswith("gptq") else
                                 (f"n{args.imatrix_calib}" + (",head" if args.imatrix_head else "")
                                  if method.startswith("imatrix") else "")))
        imatrix: dict[str, np.ndarray] | None = None
        for qtype, method, settings in jobs:
            key = "|".join([args.model, state, args.refine_calib, qtype, method, settings, str(args.ctx),
                            str(args.chunks), ",".join(args.texts)])
            if key in done:
                continue
            t0 = time.perf_counter()
            row: dict[str, Any] = {"key": key, "model": args.model, "state": state, "type": qtype, "method": method,
                                   "settings": settings}
            if qtype in PRESETS and method != "f16":
                row |= preset_arm(args, ckpt, qtype, method, settings, im_calib)
                path = Path(row.pop("path"))
            elif method == "f16":
                row |= {"bytes": export(ckpt, f16, "F16")["bytes"]}
                path = f16
            elif method == "rtn":
                path = args.work / f"{ckpt.name}-{qtype}-rtn.gguf"
                row |= {"bytes": export(ckpt, path, qtype)["bytes"]}
            elif method == "imatrix":
                export(ckpt, f16, "F16")
                if imatrix is None:
                    imatrix = importance(ckpt, *im_calib, head=args.imatrix_head)
                path = args.work / f"{ckpt.name}-{qtype}-imatrix-{settings}.gguf"
                row |= llamacpp_imatrix(f16, path, qtype, imatrix)
            elif method in ("rtn+e8", "imatrix+e8"):
                if method == "imatrix+e8" and imatrix is None:
                    imatrix = importance(ckpt, *im_calib, head=args.imatrix_head)
                path = args.work / f"{ckpt.name}-{qtype}-{method.replace('+', '-')}-{settings}.gguf"
                row |= embedding_at_q8(ckpt, path, qtype, imatrix if method == "imatrix+e8" else None)
            elif method == "gptq+e8":
                qckpt, _ = gptq_checkpoint(args.work, ckpt, qtype, parse_settings(settings))
                path = args.work / f"{qckpt.name}-e8.gguf"
                row |= export(qckpt, path, qtype, embedding="Q8_0")  # our encoder: searched scales stay exact
            else:
                qckpt, record = gptq_checkpoint(args.work, ckpt, qtype, parse_settings(settings))
                path = args.work / f"{qckpt.name}.gguf"
                row |= export(qckpt, path, qtype)
                row["quantize"] = {k: record[k] for k in ("linears_quantized", "linears_gptq",
                                                          "mean_relative_error_rtn", "mean_relative_error",
                                                          "zeros_added", "seconds")}
            row |= perplexities(path, args.texts, args.ctx, args.chunks, tokenizer)
            row["seconds"] = time.perf_counter() - t0
            add(row)


if __name__ == "__main__":
    main()
