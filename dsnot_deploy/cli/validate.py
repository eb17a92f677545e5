"""`dsnot-deploy validate`: a sparse GGUF against its dense model in llama.cpp, and the gate.

Both files run in llama.cpp on identical tokens (in a child process: a llama.cpp crash is one line
and exit 1); the comparison becomes an exit code: 0 when every given threshold holds, 1 when one
fails, 2 for bad input. Heavy imports (llama_cpp, the exporter) happen inside the handler.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsnot_deploy.cli.common import (
    EXIT_FAIL,
    EXIT_OK,
    add_logging_options,
    progress_for,
)
from dsnot_deploy.cli.options import add_eval_options, gate_config
from dsnot_deploy.sources.aliases import alias_names


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    v = sub.add_parser(
        "validate", help="measure a sparse GGUF against its dense model in llama.cpp and gate on the result",
        description="Run SPARSE.gguf and the dense model in llama.cpp on identical tokens: perplexity of both, "
                    "their ratio, mean KL divergence of the next-token distributions, top-1 agreement, per "
                    "chunk; exit 0 when every threshold holds, 1 when one fails, 2 for bad input.")
    v.add_argument("sparse", type=Path, help="the sparse GGUF file")
    v.add_argument("--dense", required=True,
                   help=f"a dense GGUF, or a model (checkpoint dir, alias {alias_names()}, HF id) exported "
                        "here to a GGUF of SPARSE's type and cached by content hash")
    v.add_argument("--checkpoint", type=Path, default=None,
                   help="the sparse HF checkpoint: adds its torch perplexity on the same tokens for reference")
    add_eval_options(v)
    out = v.add_argument_group("reports")
    out.add_argument("--json", type=Path, default=None, help="write the full report as JSON here")
    out.add_argument("--markdown", type=Path, default=None, help="write a Markdown summary here")
    out.add_argument("--plot", type=Path, default=None, help="write a PNG plot here")
    out.add_argument("--force", action="store_true", help="replace existing report files")
    add_logging_options(v)

    return {"validate": _cmd_validate}


def _cmd_validate(args: argparse.Namespace) -> int:
    from dsnot_deploy.evaluation.report import (
        build_report,
        check_outputs,
        settings_of,
        write_all,
    )
    from dsnot_deploy.evaluation.validate import ValidateConfig, run_validation

    check_outputs([args.json, args.markdown, args.plot], args.force)
    config = ValidateConfig(
        sparse=args.sparse, dense=args.dense, text=args.text or "pydoc", split=args.split, protocol=args.protocol,
        ctx=args.ctx or 2048, max_chunks=args.max_chunks, gate=gate_config(args), checkpoint=args.checkpoint,
        threads=args.threads, cache_dir=args.cache_dir, progress=progress_for(args), gpu_layers=args.gpu_layers,
    )
    result, context = run_validation(config)
    checks = config.gate.check(result)
    report = build_report(result, context, settings_of(config), checks)
    write_all(report, args.json, args.markdown, args.plot, args.force)
    print_summary(report)
    return gate_exit(checks)


def gate_exit(checks: list[Any]) -> int:
    failed = [c for c in checks if not c.passed]
    for c in checks:
        print(c.message())
    if failed:
        print(f"gate FAILED: {len(failed)} of {len(checks)} threshold(s): "
              + "; ".join(f"{c.option} by {abs(c.margin):.6g}" for c in failed))
        return EXIT_FAIL
    if checks:
        print(f"gate passed: {len(checks)} threshold(s)")
    return EXIT_OK


def print_summary(report: dict[str, Any], steps: list[tuple[str, str]] | None = None) -> None:
    """The summary table printed at the end of both commands."""
    r = report["results"]
    rows: list[tuple[str, str]] = list(steps or [])
    rows += [
        ("protocol", f"llama.cpp {r['protocol']}: {r['n_chunks']} x {r['ctx']} tokens, {r['dense']['n_scored']} scored"),
        ("type", str(report["models"]["export_type"])),
        ("perplexity dense", f"{r['dense']['ppl']:.4f}"),
        ("perplexity sparse", f"{r['sparse']['ppl']:.4f}"),
        ("ratio / increase", f"{r['ppl_ratio']:.4f} / {r['ppl_increase']:+.4f}"),
        ("mean KLD", f"{r['kld_mean']:.5f} (p99 {r['kld_quantiles']['p99']:.5f})"),
        ("top-1 agreement", f"{100 * r['top1']:.2f}%"),
        ("tokens/s", f"{r['tokens_per_second']:.1f} (decode: dense {r['dense']['tokens_per_second']:.1f}, "
                     f"sparse {r['sparse']['tokens_per_second']:.1f})"),
    ]
    if r.get("torch"):
        rows.append(("torch ppl (sparse)", f"{r['torch']['ppl']:.4f} (llama.cpp {100 * r['torch']['relative_difference']:+.3f}%)"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))
