"""The `refine` job: load a model, sample calibration text, prune layer by layer, save.

The output directory is a Hugging Face checkpoint (dense weights with exact zeros) plus the
manifest `sparsity.json`, written last; the whole directory appears atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import PruneConfig
from .driver import DriverConfig, run_layers
from .errors import UserInputError
from .manifest import MANIFEST_NAME, build_manifest, dumps
from .masks import check_shape
from .models import DTYPES, find_decoder_layers, load_model, save_checkpoint
from .textdata import load_text_source, sample_calibration

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class CalibrationConfig:
    source: str = "pydoc"  # embedded offline default; `c4`, `wikitext2` or a local file
    nsamples: int = 128  # paper default
    seqlen: int = 2048  # paper default; never derived from max_position_embeddings
    seed: int = 0

    def __post_init__(self) -> None:
        if self.nsamples < 1 or self.seqlen < 2:
            raise UserInputError(f"need nsamples >= 1 and seqlen >= 2; got {self.nsamples} and {self.seqlen}")


@dataclass(frozen=True)
class RefineJob:
    model: str
    outdir: Path
    prune: PruneConfig = field(default_factory=PruneConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    dtype: str = "float32"
    device: str = "cpu"
    batch_size: int = 1
    offload_activations: bool = False
    measure_error: bool = False
    force: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise UserInputError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.batch_size < 1 or self.calibration.nsamples % self.batch_size:
            raise UserInputError(
                f"batch size must divide nsamples; got batch {self.batch_size}, nsamples {self.calibration.nsamples}"
            )
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserInputError(f"device {self.device!r} requested but CUDA is not available here")


def check_output_dir(outdir: Path, force: bool) -> None:
    """Fail before any work if OUTDIR cannot be written."""
    if outdir.exists() and not force:
        raise UserInputError(f"output {outdir} already exists; pass --force to replace it")
    parent = outdir.absolute().parent
    if not parent.is_dir():
        raise UserInputError(f"output folder {parent} does not exist")


def refine(job: RefineJob) -> dict[str, Any]:
    """Run the whole job and return the manifest it wrote."""
    t0 = time.perf_counter()
    check_output_dir(job.outdir, job.force)
    text = load_text_source(job.calibration.source)
    loaded = load_model(job.model, dtype=DTYPES[job.dtype], device=job.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    cal = job.calibration
    samples = sample_calibration(tokenizer, list(text.documents), cal.nsamples, cal.seqlen, cal.seed)
    layers_path, layers = find_decoder_layers(model)
    for layer in layers:  # fail before any calibration work on a shape the pattern cannot take
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                check_shape(mod.weight.shape, job.prune.pattern)
    log.info(
        "refining %d decoder layers (%s) with %s + %s at %s; calibration %d x %d tokens from %s",
        len(layers), layers_path, job.prune.method.value, job.prune.refinement.value,
        job.prune.pattern.describe(), cal.nsamples, cal.seqlen, cal.source,
    )
    result = run_layers(
        model,
        layers,
        samples,
        DriverConfig(
            prune=job.prune,
            batch_size=job.batch_size,
            device=job.device,
            offload_activations=job.offload_activations,
            measure_error=job.measure_error,
            progress=job.progress,
        ),
    )
    manifest = build_manifest(
        model,
        job.prune,
        result,
        calibration=asdict(cal),
        model_source=job.model,
        layers_path=layers_path,
        extra={"run": {"device": job.device, "dtype": job.dtype, "batch_size": job.batch_size}},
    )
    manifest["times"]["end_to_end_seconds"] = time.perf_counter() - t0
    save_checkpoint(model, tokenizer, job.outdir, manifest_name=MANIFEST_NAME, manifest=dumps(manifest),
                    force=job.force)
    return manifest
