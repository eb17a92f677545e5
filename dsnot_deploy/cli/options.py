"""Option groups and their conversion to job configs, shared by several commands (refine,
refine-and-export): device/dtype, pruning and refinement, calibration, scale and reliability."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from dsnot_deploy.algorithms.config import DEFAULT_MODEL_CORRECTION
from dsnot_deploy.cli.common import add_logging_options, progress_for
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.protocols import PROTOCOLS


def add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cpu", help="where layers are processed: cpu, cuda, cuda:1 (default cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="model dtype; statistics are always float32 (default float32)")
    add_logging_options(p)


def add_refine_options(p: argparse.ArgumentParser) -> None:
    from dsnot_deploy.algorithms.config import OWL_FROM_SPARSITY  # torch-free

    g = p.add_argument_group("pruning")
    g.add_argument("--method", default="wanda", choices=["magnitude", "wanda", "sparsegpt"],
                   help="initial mask (default wanda)")
    pat = g.add_mutually_exclusive_group()
    pat.add_argument("--sparsity", type=float, default=None, help="unstructured sparsity in (0, 1) (default 0.5)")
    pat.add_argument("--pattern", default=None, help="N:M pattern, N zeros in every M columns, e.g. 2:4")
    g.add_argument("--magnitude-scope", default="per-row", choices=["per-row", "per-matrix"],
                   help="magnitude ranking group (paper baseline: per-matrix; DSnoT init: per-row)")
    r = p.add_argument_group("refinement")
    ref = r.add_mutually_exclusive_group()
    ref.add_argument("--refine", default="exact", choices=["exact", "dsnot", "none"],
                     help="mask refinement: exact = prune-and-grow judged by the exact calibration output "
                          "error (default; measured best, see docs/decisions.md), dsnot = the faithful "
                          "DSnoT of the paper, none = the initial mask alone")
    ref.add_argument("--dsnot", dest="refine", action="store_const", const="dsnot", help="same as --refine dsnot")
    ref.add_argument("--no-dsnot", dest="refine", action="store_const", const="none", help="same as --refine none")
    r.add_argument("--max-cycle-time", type=int, default=50, help="DSnoT: swaps per row at most (default 50)")
    r.add_argument("--update-threshold", type=float, default=0.1, help="DSnoT: stop a row at |error| <= this (0.1)")
    r.add_argument("--pow-of-var-regrowing", type=float, default=1.0, help="DSnoT: grow key c/var^p (default 1)")
    sign = r.add_mutually_exclusive_group()
    sign.add_argument("--same-sign", dest="same_sign", action="store_true", default=None,
                      help="DSnoT: stop a row when its error would change sign (default: on for N:M only)")
    sign.add_argument("--no-same-sign", dest="same_sign", action="store_false")
    r.add_argument("--variance", default="within-sample", choices=["within-sample", "pooled"],
                   help="DSnoT: channel variance (within-sample = reference parity)")
    r.add_argument("--skip-refine", action="append", default=[], choices=["attn", "mlp"],
                   help="prune but do not refine this group of Linears (repeatable; reference: mlp)")
    r.add_argument("--exact-max-swaps", type=int, default=128, help="exact: swaps per row at most (default 128)")
    u = p.add_argument_group("weight update (after the mask is final)")
    u.add_argument("--update", default="admm", choices=["none", "admm"],
                   help="admm = reconstruct the kept weights to minimise the calibration output error on the "
                        "final mask (ADMM, exact zeros kept; never worse than the weights it starts from; "
                        "default, measured in docs/decisions.md); none = keep them")
    u.add_argument("--reconstruct-solver", default="auto", choices=["auto", "admm", "cg"],
                   help="how --update admm solves the reconstruction: admm (one eigendecomposition of H per "
                        "Linear, --admm-iterations steps), cg (conjugate gradients on the kept weights, one "
                        "product per step, no factorisation), auto = admm below 2048 input columns, cg from there "
                        "(default; as good on held-out error and ~4x cheaper at 8B widths, docs/bench_scale.md)")
    u.add_argument("--model-correction", type=float, default=None, metavar="A",
                   help="with --update admm: reconstruct each Linear toward (1-A) x the dense Linear on the pruned "
                        "model's inputs + A x the dense model's own outputs, so it also corrects the error of the "
                        f"layers pruned before it (default {DEFAULT_MODEL_CORRECTION}, chosen on held-out text, "
                        "docs/decisions.md; 0 = off, which saves one forward per layer and half the activation "
                        "memory)")
    u.add_argument("--admm-iterations", type=int, default=40, help="ADMM steps per Linear (default 40)")
    u.add_argument("--cg-iterations", type=int, default=20, help="CG steps per Linear at most (default 20)")
    u.add_argument("--rounds", type=int, default=1,
                   help="with --refine exact --update admm: rounds of mask search and reconstruction, each search "
                        "after the first judged against the reconstructed weights (default 1)")
    r.add_argument("--exact-top-k", type=int, default=8, help="exact: candidates per side per swap (default 8)")
    r.add_argument("--exact-shrink", type=float, default=0.3, metavar="A",
                   help="exact: judge swaps on (1-A) H + A diag(H), a guard against fitting the calibration "
                        "tokens' channel correlations (default 0.3, chosen on held-out text; 0 = plain search)")
    qz = p.add_argument_group("quantization onto a GGUF type's lattice (after the mask and weights are final)")
    qz.add_argument("--quantize", default=None, metavar="TYPE", type=str.upper,
                    choices=["Q8_0", "Q5_0", "Q4_0", "SPARSE_Q4", "SPARSE_Q5"],
                    help="round every decoder Linear onto TYPE's block lattice with GPTQ error feedback through H "
                         "(pruned weights stay exactly 0; kept per Linear only where it beats ggml's "
                         "round-to-nearest on calibration data); `export --type TYPE` then writes these values "
                         "with no second rounding. SPARSE_Q4/SPARSE_Q5 follow the preset's per-tensor plan "
                         "(Q4_0/Q5_0, Q8_0 where its Q6_K falls back; Q6_K tensors stay float for llama.cpp). "
                         "Needs --dtype float32")
    qz.add_argument("--quant-damping", type=float, default=0.1, metavar="D",
                    help="GPTQ damping, a fraction of mean(diag H) (default 0.1)")
    qz.add_argument("--quant-shrinks", type=float, nargs="+", default=[1.0, 0.95, 0.9, 0.85, 0.8], metavar="S",
                    help="with --quant-scales anchor: block scale candidates as fractions of ggml's max-based "
                         "scale, the one with the lowest diag(H)-weighted rounding error kept per block (default "
                         "1.0 0.95 0.9 0.85 0.8)")
    qz.add_argument("--quant-diag-shrink", type=float, default=0.7, metavar="A",
                    help="run the sweep on (1-A) H + A diag(H), a guard against fitting the calibration tokens "
                         "(default 0.7, chosen on held-out text; 1 = no error feedback)")
    qz.add_argument("--quant-scales", default=None, choices=["anchor", "search"],
                    help="block scales: anchor = ggml's max-based scale (times the best --quant-shrinks) with the "
                         "largest weight pinned, so ggml itself reproduces every block; search = a free fp16 scale "
                         "per block searched like llama.cpp's importance-matrix quantizer with diag(H) as the "
                         "importance (Q4_0/Q5_0; `export` writes them exactly). Default: search, chosen on "
                         "held-out text (docs/quantize.md)")
    qz.add_argument("--quant-head", dest="quant_head", action=argparse.BooleanOptionalAction, default=None,
                    help="also sweep the output head (the tied token embedding) onto the lattice of a single-type "
                         "--quantize (Q4_0/Q5_0/Q8_0; presets keep their Q8_0 embedding). Default: QuantizeConfig's "
                         "(docs/quantize.md)")
    a = p.add_argument_group("layer-wise allocation (unstructured patterns)")
    a.add_argument("--allocation", default="uniform", choices=["auto", "uniform", "owl"],
                   help="owl = each decoder layer's sparsity from its share of outlier activations-times-weights "
                        "(OWL; measured on the dense model, one extra pass), the model's pruned-weight count "
                        "unchanged; uniform = every layer at the target (default: with the default model "
                        "correction OWL lost at 70%% on Gemma3-270M, docs/decisions.md); auto = owl from "
                        f"{OWL_FROM_SPARSITY:g} sparsity up, uniform below (SmolLM2's rule without model "
                        "correction). N:M stays uniform")
    a.add_argument("--owl-threshold", type=float, default=5.0, metavar="M",
                   help="OWL: a score is an outlier above M x its layer's mean score (default 5, the paper's)")
    a.add_argument("--owl-spread", type=float, default=0.08, metavar="LAMBDA",
                   help="OWL: layer sparsities span target +- LAMBDA at most (default 0.08, the paper's)")
    c = p.add_argument_group("calibration")
    c.add_argument("--calib", default="pydoc",
                   help="calibration text: c4, wikitext2 (via datasets), a .txt/.raw/.jsonl/.json.gz file, "
                        "or pydoc (offline text shipped with Python; default)")
    c.add_argument("--nsamples", type=int, default=128, help="calibration sequences (default 128)")
    c.add_argument("--seqlen", type=int, default=2048, help="tokens per calibration sequence (default 2048)")
    c.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    c.add_argument("--batch-size", type=int, default=1, help="sequences per layer forward; divides nsamples")
    c.add_argument("--offload-activations", action="store_true", help="keep layer activations on the CPU")
    c.add_argument("--measure-error", action="store_true",
                   help="also collect H to report the true output error of every method (costs time)")


def add_scale_options(p: argparse.ArgumentParser, outdir: str) -> argparse._ArgumentGroup:
    """--stream, --device-map, --offload-dir, --resume, --no-save-state, --deterministic and
    --no-memory-check (shared by refine and refine-and-export); returns the "scale" group.
    `outdir` names the checkpoint folder in the help text."""
    scale = p.add_argument_group("scale (docs/scale.md)")
    scale.add_argument("--stream", action="store_true",
                       help="read, refine and write one decoder layer at a time from the safetensors shards "
                            "(memory-mapped): memory does not grow with depth; needs a safetensors checkpoint")
    scale.add_argument("--device-map", default=None, metavar="MAP",
                       help="keep the whole model resident over several devices, placed by accelerate: auto, "
                            "balanced, balanced_low_0, sequential, or a JSON file {module: device}; each layer "
                            "is refined on its own device")
    scale.add_argument("--offload-dir", type=Path, default=None, metavar="DIR",
                       help="keep the activation buffers in memory-mapped files in DIR (disk offload)")
    rel = p.add_argument_group("interruption and resources (docs/reliability.md)")
    rel.add_argument("--resume", action="store_true",
                     help=f"continue an interrupted run from its last finished layer (state saved per layer in "
                          f".{outdir}.resume next to {outdir}); refused if any setting differs; same result as an "
                          "uninterrupted run")
    rel.add_argument("--no-save-state", dest="save_state", action="store_false",
                     help="do not save the per-layer resume state (saves one extra copy of the weights on disk)")
    rel.add_argument("--deterministic", action="store_true",
                     help="CUDA: deterministic kernels only (torch.use_deterministic_algorithms, fixed cuBLAS "
                          "workspace, no TF32), for identical bits run to run; the CPU is deterministic anyway")
    rel.add_argument("--no-memory-check", dest="memory_check", action="store_false",
                     help="skip the check that the estimated memory (activations, statistics, one layer) fits in "
                          "what is available before calibration")
    return scale


def scale_job_options(args: argparse.Namespace) -> dict[str, Any]:
    """RefineJob's fields for the options `add_scale_options` adds."""
    return {"stream": args.stream, "activations_dir": args.offload_dir, "device_map": device_map_arg(args.device_map),
            "resume": args.resume, "save_state": args.save_state, "memory_check": args.memory_check,
            "deterministic": args.deterministic}


def prune_config(args: argparse.Namespace) -> Any:
    """The PruneConfig of the pruning and refinement options."""
    from dsnot_deploy.algorithms.config import (
        Allocation,
        AllocationConfig,
        DSnoTConfig,
        ExactConfig,
        MagnitudeScope,
        Method,
        PruneConfig,
        ReconstructConfig,
        Refinement,
        Solver,
        SparsityPattern,
        Update,
        VarianceKind,
    )

    if args.pattern is not None:
        pattern = SparsityPattern.parse(args.pattern)
    else:
        pattern = SparsityPattern.unstructured(0.5 if args.sparsity is None else args.sparsity)
    update = Update(args.update)
    correction = args.model_correction
    if correction is None:
        correction = DEFAULT_MODEL_CORRECTION if update is Update.ADMM else 0.0
    elif correction and update is not Update.ADMM:
        raise UserInputError(f"expected --update admm with --model-correction; found --update {update.value}")
    return PruneConfig(
        method=Method(args.method),
        pattern=pattern,
        refinement=Refinement(args.refine),
        magnitude_scope=MagnitudeScope(args.magnitude_scope),
        dsnot=DSnoTConfig(
            max_cycle_time=args.max_cycle_time,
            update_threshold=args.update_threshold,
            pow_of_var_regrowing=args.pow_of_var_regrowing,
            same_sign=args.same_sign,
            variance=VarianceKind(args.variance),
        ),
        exact=ExactConfig(max_swaps=args.exact_max_swaps, top_k=args.exact_top_k, shrink=args.exact_shrink),
        skip_refine_groups=tuple(args.skip_refine),
        update=update,
        reconstruct=ReconstructConfig(iterations=args.admm_iterations, rounds=args.rounds,
                                      solver=Solver(args.reconstruct_solver), cg_iterations=args.cg_iterations,
                                      model_correction=correction),
        allocation=AllocationConfig(kind=Allocation(args.allocation), outlier_threshold=args.owl_threshold,
                                    spread=args.owl_spread),
    )


def device_map_arg(text: str | None) -> Any:
    """--device-map: a placement name, or the {module: device} mapping of a JSON file."""
    if text is None or text in ("auto", "balanced", "balanced_low_0", "sequential"):
        return text
    try:
        value = json.loads(Path(text).read_text())
    except (OSError, ValueError) as exc:
        raise UserInputError(f"expected --device-map auto/balanced/balanced_low_0/sequential or a JSON file "
                             f"{{module: device}}; found {text!r} ({exc})") from None
    if not isinstance(value, dict):
        raise UserInputError(f"expected a JSON object {{module: device}} in {text}; found {type(value).__name__}")
    return value


def add_eval_options(p: argparse.ArgumentParser, reduced_note: bool = False, comparison: bool = True) -> None:
    g = p.add_argument_group("evaluation (llama.cpp)")
    g.add_argument("--text", default=None,
                   help="evaluation text: wikitext2, c4, a .txt/.raw/.jsonl/.json.gz file, or pydoc (default)")
    g.add_argument("--split", default=None, help="dataset split for wikitext2/c4 (default test/validation)")
    g.add_argument("--protocol", default="llamacpp", choices=list(PROTOCOLS),
                   help="llamacpp = llama-perplexity's (second half of each chunk scored, BOS first; default), "
                        "paper = every position of each chunk")
    note = " (default 2048; 512 with no MODEL)" if reduced_note else " (default 2048)"
    g.add_argument("--ctx", type=int, default=None, help="tokens per chunk, n_ctx" + note)
    note = " (default all; 8 with no MODEL)" if reduced_note else " (default all)"
    g.add_argument("--max-chunks", type=int, default=None, help="score at most this many chunks" + note)
    g.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs)")
    g.add_argument("--gpu-layers", type=int, default=0, metavar="N",
                   help="layers llama.cpp offloads to a GPU: 0 = CPU (default), -1 = all; needs a llama.cpp "
                        "build with GPU offload (an error otherwise)")
    if not comparison:  # one model scored alone (frontier): no dense cache, no gate
        return
    g.add_argument("--cache-dir", type=Path, default=None,
                   help="where dense models exported to GGUF are cached (default $XDG_CACHE_HOME/dsnot-deploy/gguf)")
    gate = p.add_argument_group("gate (exit 1 when one fails)")
    gate.add_argument("--max-ppl-ratio", type=float, default=None, help="sparse ppl / dense ppl must be <= R")
    gate.add_argument("--max-ppl-increase", type=float, default=None,
                      help="sparse ppl - dense ppl (perplexity points) must be <= D")
    gate.add_argument("--max-kld", type=float, default=None, help="mean KL(dense || sparse) in nats must be <= K")
    gate.add_argument("--min-top1", type=float, default=None,
                      help="top-1 agreement, a fraction in [0, 1] (0.9 = 90%%), must be >= A")


def gate_config(args: argparse.Namespace) -> Any:
    """The GateConfig of the gate options."""
    from dsnot_deploy.evaluation.gate import GateConfig

    return GateConfig(max_ppl_ratio=args.max_ppl_ratio, max_ppl_increase=args.max_ppl_increase,
                      max_kld=args.max_kld, min_top1=args.min_top1)


def refine_job(args: argparse.Namespace, model: str, outdir: Path, nsamples: int, seqlen: int,
               scale: dict[str, Any] | None = None) -> Any:
    """The one RefineJob of a command's options (refine, its dry run, refine-and-export)."""
    from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob

    return RefineJob(
        model=model, outdir=outdir, prune=prune_config(args),
        calibration=CalibrationConfig(args.calib, nsamples, seqlen, args.seed), dtype=args.dtype,
        device=args.device, batch_size=args.batch_size, offload_activations=args.offload_activations,
        measure_error=args.measure_error, force=args.force, progress=progress_for(args),
        quantize=quantize_config(args),
        **(scale_job_options(args) if scale is None else scale),
    )


def quantize_config(args: argparse.Namespace) -> Any:
    """The QuantizeConfig of --quantize and its settings, or None."""
    if getattr(args, "quantize", None) is None:
        return None
    from dsnot_deploy.quant.gptq import QuantizeConfig

    return QuantizeConfig(type=args.quantize, damping=args.quant_damping, shrinks=tuple(args.quant_shrinks),
                          diag_shrink=args.quant_diag_shrink, **quantize_overrides(args))


def quantize_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The quantization options that default to QuantizeConfig's when not given."""
    out: dict[str, Any] = {}
    if getattr(args, "quant_scales", None):
        out["scales"] = args.quant_scales
    if getattr(args, "quant_head", None) is not None:
        out["head"] = args.quant_head
    return out
