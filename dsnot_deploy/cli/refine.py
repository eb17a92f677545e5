"""`dsnot-deploy refine`: prune and refine a model layer by layer, save a sparse checkpoint."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dsnot_deploy.cli.common import EXIT_OK
from dsnot_deploy.cli.options import (
    add_device_options,
    add_refine_options,
    add_scale_options,
    refine_job,
)
from dsnot_deploy.sources.aliases import alias_names


def register(sub: Any) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser("refine", help="prune a model layer by layer and save a sparse checkpoint",
                       description="Prune every Linear of the decoder layers (magnitude/Wanda/SparseGPT), "
                                   "refine the masks (exact or DSnoT), save a HF checkpoint + sparsity.json.")
    p.add_argument("model", help=f"HF model id, local checkpoint dir, .gguf file, or alias ({alias_names()})")
    p.add_argument("outdir", type=Path, help="output checkpoint directory (created atomically)")
    p.add_argument("--force", action="store_true", help="replace OUTDIR if it exists")
    add_refine_options(p)
    scale = add_scale_options(p, "OUTDIR")
    scale.add_argument("--dry-run", action="store_true",
                       help="print the memory needed per device and the expected time (from the config and "
                            "rates measured here), then stop without reading weights or writing anything")
    add_device_options(p)

    return {"refine": _cmd_refine}


def _cmd_refine(args: argparse.Namespace) -> int:
    from dsnot_deploy.layerwise.manifest import pipeline_name
    from dsnot_deploy.layerwise.refine import refine

    job = refine_job(args, args.model, args.outdir, args.nsamples, args.seqlen)
    if args.dry_run:
        return _cmd_refine_dry_run(args, job)
    manifest = refine(job)
    s = manifest["sparsity"]
    print(
        f"wrote {args.outdir}: {pipeline_name(manifest)}, "
        f"sparsity {s['pruned_linears']:.4f} of pruned Linears ({s['all_parameters']:.4f} of all parameters), "
        f"mask time {manifest['times']['mask_seconds']:.1f} s, "
        f"end-to-end {manifest['times']['end_to_end_seconds']:.1f} s"
    )
    if manifest.get("error"):
        err = manifest["error"]
        print(
            f"calibration output error (relative, mean over Linears): {err['mean_relative_output_error_init']:.5f}"
            f" -> {err['mean_relative_output_error_final']:.5f}"
        )
    return EXIT_OK


def _cmd_refine_dry_run(args: argparse.Namespace, job: Any) -> int:
    """``job`` was built (and so validated) exactly as a real run's."""
    from dsnot_deploy.layerwise.estimate import (
        RunShape,
        estimate_for_spec,
        format_estimate,
    )
    device_map = job.device_map
    n_devices = 1
    if device_map is not None:
        import torch

        n_devices = (len({str(v) for v in device_map.values()}) if isinstance(device_map, dict)
                     else max(torch.cuda.device_count(), 1))
    activations = "disk" if args.offload_dir is not None else "cpu" if args.offload_activations else "device"
    run = RunShape(nsamples=args.nsamples, seqlen=args.seqlen, batch_size=args.batch_size, dtype=args.dtype,
                   device=args.device, stream=args.stream, activations=activations, n_devices=n_devices,
                   measure_error=args.measure_error)
    print(format_estimate(estimate_for_spec(args.model, run, job.prune)))
    return EXIT_OK
