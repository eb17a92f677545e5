"""The `refine` job: load a model, sample calibration text, prune layer by layer, save.

The output directory is a Hugging Face checkpoint (dense weights with exact zeros) plus the
manifest `sparsity.json`, written last; the whole directory appears atomically.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from dsnot_deploy.algorithms.allocation import LayerAllocation
from dsnot_deploy.algorithms.config import OWL_FROM_SPARSITY, Allocation, PruneConfig
from dsnot_deploy.algorithms.masks import check_shape
from dsnot_deploy.atomic import remove_stale_temporaries
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.allocate import plan_allocation, plan_allocation_streamed
from dsnot_deploy.layerwise.driver import DriverConfig, DriverResult, run_layers
from dsnot_deploy.layerwise.manifest import MANIFEST_NAME, build_manifest, dumps
from dsnot_deploy.progress import Progress
from dsnot_deploy.quant.gptq import QuantizeConfig
from dsnot_deploy.quant.head import quantize_head
from dsnot_deploy.quant.record import quantize_record
from dsnot_deploy.sources.checkpoint_io import save_checkpoint
from dsnot_deploy.sources.models import (
    DTYPES,
    find_decoder_layers,
    load_model,
    load_model_dispatched,
)
from dsnot_deploy.sources.textdata import load_text_source, sample_calibration

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
    progress: Progress = True
    stream: bool = False  # read/refine/write one decoder layer at a time from safetensors shards
    activations_dir: Path | None = None  # disk offload: activation buffers memory-mapped from files here
    device_map: str | dict[str, Any] | None = None  # several GPUs: place the whole model with accelerate
    # Per-layer state in .OUTDIR.resume (see resume.py): saved unless save_state is off; `resume`
    # continues an interrupted run from it.
    resume: bool = False
    save_state: bool = True
    memory_check: bool = True  # refuse a job whose estimated memory exceeds what is available (resources.py)
    deterministic: bool = False  # deterministic CUDA kernels, no TF32 (see set_deterministic)
    quantize: QuantizeConfig | None = None  # round the final weights onto a GGUF type's lattice (quant.gptq)

    def __post_init__(self) -> None:
        if self.resume and not self.save_state:
            raise UserInputError("expected --resume to continue from the saved per-layer state; found --no-save-state "
                                 "too, which turns that state off")
        if self.stream and self.device_map is not None:
            raise UserInputError("expected either --stream (one layer at a time) or --device-map (the whole model "
                                 "resident over several devices); found both")
        if self.activations_dir is not None and not Path(self.activations_dir).is_dir():
            raise UserInputError(f"expected an existing folder for the activation files; found {self.activations_dir}")
        if self.dtype not in DTYPES:
            raise UserInputError(f"dtype must be one of {sorted(DTYPES)}; got {self.dtype!r}")
        if self.batch_size < 1 or self.calibration.nsamples % self.batch_size:
            raise UserInputError(
                f"batch size must divide nsamples; got batch {self.batch_size}, nsamples {self.calibration.nsamples}"
            )
        if self.quantize is not None and self.dtype != "float32":
            raise UserInputError(f"expected --dtype float32 with --quantize {self.quantize.type} (lattice values "
                                 f"need float32's mantissa to be stored exactly); found --dtype {self.dtype}")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserInputError(f"device {self.device!r} requested but CUDA is not available here")


def check_output_dir(outdir: Path, force: bool) -> None:
    """Fail before any work if OUTDIR cannot be written."""
    outdir = Path(outdir).expanduser()
    parent = outdir.absolute().parent
    if not parent.is_dir():
        what = "is not a folder" if parent.exists() else "does not exist"
        raise UserInputError(f"output folder {parent} {what}")
    remove_stale_temporaries(outdir)  # a killed earlier run: its temporaries go, a displaced OUTDIR comes back
    if (outdir.exists() or outdir.is_symlink()) and not force:
        raise UserInputError(f"output {outdir} already exists; pass --force to replace it")
    if outdir.exists() and not outdir.is_dir():
        raise UserInputError(f"output {outdir} is a file; expected a checkpoint folder name")
    import os

    if not os.access(parent, os.W_OK):
        raise UserInputError(f"output folder {parent} is not writable")


def _driver_config(job: RefineJob) -> DriverConfig:
    return DriverConfig(
        prune=job.prune,
        batch_size=job.batch_size,
        device=job.device,
        offload_activations=job.offload_activations,
        measure_error=job.measure_error,
        progress=job.progress,
        activations_dir=str(job.activations_dir) if job.activations_dir is not None else None,
        layers_in_place=job.device_map is not None,
        quantize=job.quantize,
    )


def _check_shapes(layers: Any, job: RefineJob) -> None:
    """Fail before any calibration work on a shape the pattern cannot take (meta tensors work too)."""
    for layer in layers:
        for mod in layer.modules():
            if isinstance(mod, torch.nn.Linear):
                check_shape(mod.weight.shape, job.prune.pattern)


def set_deterministic() -> None:
    """Ask torch for run-to-run identical results on CUDA (docs/reliability.md); harmless on the CPU.

    `torch.use_deterministic_algorithms(True)` (an op without a deterministic kernel then raises
    instead of silently varying), a fixed cuBLAS workspace (``CUBLAS_WORKSPACE_CONFIG=:4096:8``,
    needed by that mode; only effective before the first cuBLAS call), no cuDNN autotuning, no TF32.
    """
    import os

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def refine(job: RefineJob) -> dict[str, Any]:
    """Run the whole job and return the manifest it wrote."""
    if job.deterministic:
        set_deterministic()
    if job.stream:
        return refine_streaming(job)
    t0 = time.perf_counter()
    check_output_dir(job.outdir, job.force)
    text = load_text_source(job.calibration.source)
    if job.device_map is not None:
        loaded = load_model_dispatched(job.model, DTYPES[job.dtype], job.device_map)
    else:
        loaded = load_model(job.model, dtype=DTYPES[job.dtype], device=job.device)
    model, tokenizer = loaded.model, loaded.tokenizer
    cal = job.calibration
    samples = sample_calibration(tokenizer, list(text.documents), cal.nsamples, cal.seqlen, cal.seed)
    layers_path, layers = find_decoder_layers(model)
    _check_shapes(layers, job)
    device = job.device
    if job.device_map is not None:  # calibration batches enter where the embeddings live
        device = str(model.get_input_embeddings().weight.device)
    else:
        _check_memory(job, model, weights_loaded=True)
    log.info(
        "refining %d decoder layers (%s) with %s + %s at %s; calibration %d x %d tokens from %s",
        len(layers), layers_path, job.prune.method.value, job.prune.refinement.value,
        job.prune.pattern.describe(), cal.nsamples, cal.seqlen, cal.source,
    )
    config = replace(_driver_config(job), device=device)
    allocation = plan_allocation(model, layers, samples, config)
    state = _open_state(job, samples, loaded.source.path, len(layers))
    with _state_kept_on_failure(state):
        result = run_layers(model, layers, samples, replace(config, allocation=allocation), state=state)
        head = quantize_head(model, layers_path, result.hidden, job.quantize) if job.quantize is not None else None
        manifest = build_manifest(
            model,
            job.prune,
            result,
            calibration=asdict(cal),
            model_source=job.model,
            layers_path=layers_path,
            extra={"run": _run_record(job), "allocation": allocation_record(job.prune, allocation),
                   **quantize_record(job.quantize, result, head)},
        )
        manifest["times"]["end_to_end_seconds"] = time.perf_counter() - t0
        save_checkpoint(model, tokenizer, job.outdir, manifest_name=MANIFEST_NAME, manifest=dumps(manifest),
                        extra_files={STATS_NAME: calibration_stats_bytes(result, layers_path)}, force=job.force)
    return manifest


# Fields of sparsity.json that are wall-clock measurements: the only ones that differ between two
# runs with the same inputs and seed on the same machine (tests/test_determinism.py).
TIME_FIELDS = ("times.*", "sparsity.per_layer[].seconds", "linears[].mask_seconds")


def _state_settings(job: RefineJob, samples: torch.Tensor, model_path: Path | None) -> dict[str, Any]:
    """Everything that decides the bits of the result; a resume must match it exactly."""
    from dsnot_deploy import __version__
    from dsnot_deploy.layerwise.manifest import _enum_safe
    from dsnot_deploy.layerwise.resume import files_identity, tensor_sha256

    return {
        "tool_version": __version__,
        "torch": torch.__version__,
        "model": job.model,
        "model_files": files_identity(model_path),
        "prune": _enum_safe(asdict(job.prune)),
        "calibration": asdict(job.calibration),
        "calibration_tokens_sha256": tensor_sha256(samples),
        "dtype": job.dtype,
        "device": job.device,
        "batch_size": job.batch_size,
        "measure_error": job.measure_error,
        "stream": job.stream,
        "device_map": job.device_map,
        "deterministic": job.deterministic,
        **({"quantize": asdict(job.quantize)} if job.quantize is not None else {}),
    }


def _open_state(job: RefineJob, samples: torch.Tensor, model_path: Path | None, n_layers: int):
    if not job.save_state:
        return None
    from dsnot_deploy.layerwise.resume import RefineState

    return RefineState.open(job.outdir, _state_settings(job, samples, model_path), n_layers, job.resume, job.force)


class _state_kept_on_failure:
    """Remove the state once the output is in place; on any failure keep it (and say how to resume)."""

    def __init__(self, state: Any) -> None:
        self.state = state

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self.state is None:
            return False
        if exc_type is None:
            self.state.remove()
        else:
            self.state.close()
            if self.state.done:
                log.warning("kept the state of %d finished layers in %s: rerun the same command with --resume to "
                            "continue from layer %d", self.state.done, self.state.folder, self.state.done)
        return False


def _check_memory(job: RefineJob, model: torch.nn.Module, weights_loaded: bool) -> None:
    if not job.memory_check:
        return
    from dsnot_deploy.layerwise.estimate import RunShape, shape_of
    from dsnot_deploy.layerwise.resources import check_fits

    activations = "disk" if job.activations_dir is not None else "cpu" if job.offload_activations else "device"
    run = RunShape(nsamples=job.calibration.nsamples, seqlen=job.calibration.seqlen, batch_size=job.batch_size,
                   dtype=job.dtype, device=job.device, stream=job.stream, activations=activations,
                   measure_error=job.measure_error)
    check_fits(shape_of(model), run, job.prune, weights_loaded=weights_loaded,
               output_parent=Path(job.outdir).expanduser().absolute().parent, activations_dir=job.activations_dir,
               state_saved=job.save_state)


STATS_NAME = "calibration_stats.safetensors"


def calibration_stats_bytes(result: DriverResult, layers_path: str) -> bytes:
    """Per-Linear mean of x_j^2 over the calibration tokens (safetensors, keyed by full module name).

    `export` turns it into llama.cpp's importance matrix for its quantizer.
    """
    from safetensors.torch import save

    tensors = {f"{layers_path}.{layer.index}.{name}": values.contiguous()
               for layer in result.layers for name, values in layer.input_sq_mean.items()}
    # One metadata key only: safetensors writes the metadata map in hash order, which changes from
    # process to process when it holds several keys (the file would differ between two runs).
    return save(tensors, metadata={"format": "pt"})


def allocation_record(prune: PruneConfig, allocation: LayerAllocation | None) -> dict[str, Any]:
    """The manifest's ``allocation`` entry: OWL's ratios and counts, or the uniform rule (and why)."""
    if allocation is not None:
        return allocation.record()
    record: dict[str, Any] = {"kind": Allocation.UNIFORM.value}
    if prune.allocation.kind is not Allocation.UNIFORM:
        record["requested"] = prune.allocation.kind.value
        record["reason"] = ("N:M patterns prune every group alike" if prune.pattern.is_nm else
                            f"auto allocation is OWL from {OWL_FROM_SPARSITY:g} sparsity up, uniform below "
                            "(docs/decisions.md)")
    return record


def _run_record(job: RefineJob) -> dict[str, Any]:
    record: dict[str, Any] = {"device": job.device, "dtype": job.dtype, "batch_size": job.batch_size}
    if job.stream:
        record["stream"] = True
    if job.device_map is not None:
        record["device_map"] = job.device_map
    if job.activations_dir is not None:
        record["activations"] = "disk"
    elif job.offload_activations:
        record["activations"] = "cpu"
    return record


def refine_streaming(job: RefineJob) -> dict[str, Any]:
    """The job with `stream=True`: one decoder layer in memory at a time (see `stream`).

    Needs a safetensors checkpoint (directory or Hub id); writes the same checkpoint as
    `refine` (sharded: the non-layer tensors, then one shard per layer, plus the index).
    """
    from dsnot_deploy.layerwise.stream import plan_stream, stream_layers
    from dsnot_deploy.sources.streaming_io import (
        SafetensorsCheckpoint,
        ShardedCheckpointWriter,
        build_skeleton,
        load_generation_config,
        load_tokenizer,
        streamable_checkpoint_dir,
    )

    t0 = time.perf_counter()
    check_output_dir(job.outdir, job.force)
    source, directory = streamable_checkpoint_dir(job.model)
    checkpoint = SafetensorsCheckpoint.open(directory)
    text = load_text_source(job.calibration.source)
    skeleton = build_skeleton(directory, DTYPES[job.dtype])
    tokenizer = load_tokenizer(directory)
    cal = job.calibration
    samples = sample_calibration(tokenizer, list(text.documents), cal.nsamples, cal.seqlen, cal.seed)
    layers_path, layers = find_decoder_layers(skeleton)
    _check_shapes(layers, job)
    plan = plan_stream(skeleton, checkpoint)
    _check_memory(job, skeleton, weights_loaded=False)
    log.info(
        "streaming %d decoder layers (%s) of %s with %s + %s at %s; calibration %d x %d tokens from %s",
        len(layers), layers_path, directory, job.prune.method.value, job.prune.refinement.value,
        job.prune.pattern.describe(), cal.nsamples, cal.seqlen, cal.source,
    )
    allocation = plan_allocation_streamed(skeleton, checkpoint, samples, _driver_config(job), plan)
    state = _open_state(job, samples, directory, len(layers))
    with _state_kept_on_failure(state), ShardedCheckpointWriter(job.outdir, plan.n_shards, force=job.force) as writer:
        streamed = stream_layers(skeleton, checkpoint, samples, replace(_driver_config(job), allocation=allocation),
                                 writer, plan=plan, state=state)
        if job.quantize is not None and job.quantize.head:
            log.warning("--stream: the output head is quantized by export (round to nearest), not in refinement")
        # build_manifest counts zeros over a model's parameters; the skeleton holds none (meta), so
        # it gets an empty module and the counts come from the tensors the writer wrote.
        manifest = build_manifest(
            torch.nn.Module(), job.prune, streamed.driver, calibration=asdict(cal), model_source=job.model,
            layers_path=layers_path,
            extra={"run": _run_record(job), "allocation": allocation_record(job.prune, allocation),
                   **quantize_record(job.quantize, streamed.driver)},
        )
        manifest["model"]["class"] = type(skeleton).__name__
        s = manifest["sparsity"]
        s["all_parameters_zeros"], s["all_parameters_params"] = streamed.zeros, streamed.params
        s["all_parameters"] = streamed.zeros / max(streamed.params, 1)
        manifest["times"]["end_to_end_seconds"] = time.perf_counter() - t0
        writer.write_extra(STATS_NAME, calibration_stats_bytes(streamed.driver, layers_path))
        writer.commit(skeleton.config, tokenizer, load_generation_config(directory, skeleton),
                      manifest_name=MANIFEST_NAME, manifest=dumps(manifest))
    return manifest
