"""Layer-sequential driver (algorithms.md section 1, step 3).

For each decoder layer: a calibrate pass with hooks on its Linears (statistics), masks for
every Linear, then a propagate pass of the now-sparse layer whose outputs feed the next layer.
Only one layer's inputs/outputs and statistics are alive at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from torch import nn

from dsnot_deploy.algorithms.allocation import LayerAllocation
from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.algorithms.pruner import LinearReport
from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
from dsnot_deploy.layerwise.capture import (
    LayerCall,
    capture_layer_inputs,
    layer_output,
    to_device,
)
from dsnot_deploy.layerwise.dense_stream import DenseStream, open_dense_stream
from dsnot_deploy.layerwise.linear import prune_linear, quantize_linear
from dsnot_deploy.progress import Progress, open_bar
from dsnot_deploy.quant.gptq import QuantizeConfig
from dsnot_deploy.quant.report import QuantReport

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverConfig:
    prune: PruneConfig | None  # None: run the layers without pruning (checks, dense baselines)
    batch_size: int = 1  # calibration sequences per forward; must divide nsamples
    device: str = "cpu"  # where each layer is processed
    offload_activations: bool = False  # keep the B x L x hidden buffers on CPU
    measure_error: bool = False  # collect H even when the method does not need it
    progress: Progress = True
    # Keep the two activation buffers in memory-mapped files in this folder (disk offload; the
    # files are unlinked at once, so nothing is left behind).  Implies offload_activations.
    activations_dir: str | None = None
    # Leave every layer where it is (a model dispatched over several devices with accelerate's
    # device_map) and process it on its own device, instead of moving it to `device`.
    layers_in_place: bool = False
    # Per-layer counts of a non-uniform allocation (``layerwise.allocate``); None: the pattern everywhere
    allocation: LayerAllocation | None = None
    # Round every decoder Linear onto this ggml lattice once its mask and kept weights are final
    # (GPTQ sweep, ``quant.gptq``); later layers are calibrated on the quantized prefix
    quantize: QuantizeConfig | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1; got {self.batch_size}")

    @property
    def with_hessian(self) -> bool:
        """Whether the calibrate pass accumulates X^T X for every Linear."""
        if self.quantize is not None:
            return True
        return self.prune is not None and (self.prune.needs_hessian or self.measure_error)

    @property
    def tracks_dense_model(self) -> bool:
        """Whether the dense model's activations are carried too (reconstruction toward the dense model)."""
        return self.prune is not None and self.prune.matches_dense_model

    @property
    def store_device(self) -> str:
        """Where the (nsamples, L, hidden) activation buffers live."""
        return "cpu" if (self.offload_activations or self.activations_dir) else self.device


@dataclass
class LayerReport:
    index: int
    linears: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0
    # per Linear (name inside the layer): mean over calibration tokens of x_j^2, float32 on the CPU;
    # llama.cpp's importance matrix entry (= Wanda's sqnorm / L)
    input_sq_mean: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    quant: list[QuantReport] = field(default_factory=list)  # per Linear, when the driver quantizes


@dataclass
class DriverResult:
    layers: list[LayerReport]
    hidden: torch.Tensor  # outputs of the last decoder layer, (nsamples, L, hidden)
    mask_seconds: float
    seconds: float


class LayerStateStore(Protocol):
    """Where finished layers are saved, and read back on resume (``resume.RefineState``)."""

    done: int  # layers finished by an earlier, interrupted run

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None: ...

    def restore(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport]: ...


class LayerObserver(Protocol):
    """Called with each decoder layer (on its device), its inputs and call, before it is processed."""

    def __call__(self, index: int, layer: nn.Module, hidden: torch.Tensor, call: LayerCall,
                 config: DriverConfig) -> None: ...


def layer_tensors(layer: nn.Module) -> dict[str, torch.Tensor]:
    """The layer's state_dict as CPU tensors that own their memory (what a resume state saves)."""
    return {name: t.detach().to("cpu", copy=True).contiguous() for name, t in layer.state_dict().items()}


def propagate_restored(
    layer: nn.Module, hidden: torch.Tensor, out: torch.Tensor, call: LayerCall, config: DriverConfig,
    device: torch.device | str,
) -> None:
    """The propagate pass of a layer restored from a resume state: the same code and batch split as
    ``process_layer``'s, so its outputs are the same bits as in the uninterrupted run."""
    _run_layer(layer, hidden, call, config.batch_size, str(device), out)


def linear_group(name: str) -> str:
    """'attn' or 'mlp' (or 'other') from a Linear's qualified name inside its layer."""
    lowered = name.lower()
    if "attn" in lowered or "attention" in lowered:
        return "attn"
    if any(tag in lowered for tag in ("mlp", "feed_forward", "ffn")):
        return "mlp"
    return "other"


def _linears(layer: nn.Module) -> dict[str, nn.Linear]:
    return {name: mod for name, mod in layer.named_modules() if isinstance(mod, nn.Linear)}


def _run_layer(layer: nn.Module, hidden: torch.Tensor, call: LayerCall, batch_size: int, device: str,
               out: torch.Tensor | None) -> None:
    with torch.no_grad():
        for start in range(0, hidden.shape[0], batch_size):
            # non_blocking: with pinned host buffers the copies queue behind the compute (no host sync)
            x = hidden[start : start + batch_size].to(device, non_blocking=True)
            y = layer_output(layer(x, *call.args, **call.kwargs))
            if out is not None:
                out[start : start + batch_size].copy_(y, non_blocking=True)


def _calibrate(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, call: LayerCall,
    config: DriverConfig, with_hessian: bool, dense: DenseStream | None = None,
) -> dict[str, ChannelStats]:
    """Statistics per Linear; Linears fed the same tensor share one ChannelStats.

    With a `dense` stream the (still dense) layer first runs on the dense model's inputs: its Linears'
    inputs are paired with the pruned model's (``ChannelStats.cross``) and its outputs go to `dense.out`.
    """
    stats: dict[str, ChannelStats] = {}
    seen: dict[int, tuple[torch.Tensor, ChannelStats]] = {}  # refs keep ids unique per batch
    dense_inputs: dict[str, torch.Tensor] = {}  # per Linear, this batch's inputs in the dense model
    capturing = [False]

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if capturing[0]:
                dense_inputs[name] = x.detach()
                return
            if id(x) in seen:
                shared = seen[id(x)][1]
                stats.setdefault(name, shared)
                return
            st = stats.get(name)
            if st is None:
                st = ChannelStats(module.in_features, with_hessian, device=config.device, with_cross=dense is not None)
                stats[name] = st
            seen[id(x)] = (x, st)
            accumulate(st, x.detach(), dense_inputs.get(name))

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in linears.items()]
    try:
        with torch.no_grad():
            for start in range(0, hidden.shape[0], config.batch_size):
                stop = start + config.batch_size
                if dense is not None:
                    capturing[0] = True
                    y = layer_output(layer(dense.hidden[start:stop].to(config.device, non_blocking=True),
                                           *call.args, **call.kwargs))
                    dense.out[start:stop].copy_(y, non_blocking=True)
                    capturing[0] = False
                x = hidden[start:stop].to(config.device, non_blocking=True)
                layer(x, *call.args, **call.kwargs)
                seen.clear()
                dense_inputs.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def allocate_activations(
    shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str, directory: str | None = None,
    like_device: torch.device | str | None = None,
) -> torch.Tensor:
    """An uninitialised activation buffer: on `device`, or memory-mapped from a file in `directory`.

    A disk buffer is a shared mapping of a fresh file that is unlinked at once (the mapping keeps
    it alive), so the kernel can write its pages out instead of holding them in RAM.  When the
    layers run on CUDA (`like_device`), a host buffer is pinned so copies can be asynchronous.
    """
    if directory is not None:
        import os
        import tempfile

        numel = 1
        for d in shape:
            numel *= d
        fd, path = tempfile.mkstemp(prefix="dsnot-activations-", suffix=".bin", dir=directory)
        os.close(fd)
        try:
            buf = torch.from_file(path, shared=True, size=numel, dtype=dtype)
        finally:
            os.unlink(path)
        return buf.view(shape)
    pin = torch.device(device).type == "cpu" and like_device is not None and torch.device(like_device).type == "cuda"
    return torch.empty(shape, dtype=dtype, device=device, pin_memory=pin)


def process_layer(
    index: int,
    layer: nn.Module,
    hidden: torch.Tensor,
    out: torch.Tensor,
    call: LayerCall,
    config: DriverConfig,
    device: torch.device | str,
    dense: DenseStream | None = None,
) -> tuple[LayerReport, float]:
    """Calibrate, prune and propagate one decoder layer already on `device`, in place.

    `hidden` holds the layer's inputs; its outputs (of the pruned layer) are written to `out`; with a
    `dense` stream the dense layer's outputs on the dense inputs go to `dense.out` (see `_calibrate`).
    Returns the layer's report and its mask seconds.  `call` must already be on `device`.
    """
    t_layer = time.perf_counter()
    report = LayerReport(index=index)
    mask_seconds = 0.0
    prune, quantize = config.prune, config.quantize
    if prune is not None or quantize is not None:
        per_device = config if device == config.device else _with_device(config, device)
        linears = _linears(layer)
        stats = _calibrate(layer, linears, hidden, call, per_device, config.with_hessian, dense)
        for name, mod in linears.items():
            if name not in stats:  # a Linear the forward never called stays dense
                log.warning("layer %d: %s was not called during calibration; left dense", index, name)
                continue
            st = stats[name]
            report.input_sq_mean[name] = (st.sq_sum / max(st.n_tokens, 1)).detach().to("cpu", torch.float32)
            if prune is not None:
                refine = linear_group(name) not in prune.skip_refine_groups
                own = prune
                if config.allocation is not None:
                    own = replace(prune, pattern=config.allocation.pattern(index, name, prune.pattern))
                new_weight, lrep = prune_linear(f"{index}.{name}", mod.weight, st, own, refine)
                mod.weight.data.copy_(new_weight.to(mod.weight.dtype))
                mask_seconds += lrep.mask_seconds
                report.linears.append(lrep)
            if quantize is not None:
                done = quantize_linear(f"{index}.{name}", mod.weight, st, quantize)
                if done is not None:
                    mod.weight.data.copy_(done[0])
                    mask_seconds += done[1].seconds
                    report.quant.append(done[1])
        del stats
    _run_layer(layer, hidden, call, config.batch_size, device, out)
    report.seconds = time.perf_counter() - t_layer
    return report, mask_seconds


def _with_device(config: DriverConfig, device: torch.device | str) -> DriverConfig:
    return replace(config, device=str(device))


def _layer_device(layer: nn.Module) -> torch.device:
    devices = {p.device for p in layer.parameters()}
    if len(devices) != 1 or next(iter(devices)).type == "meta":
        raise ValueError(
            f"expected every parameter of a decoder layer on one real device; found {sorted(map(str, devices))}"
        )
    return next(iter(devices))


def run_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    samples: torch.Tensor,
    config: DriverConfig,
    on_layer_done: Callable[[LayerReport], None] | None = None,
    state: LayerStateStore | None = None,
    before_layer: LayerObserver | None = None,
) -> DriverResult:
    """Prune (or just run, when config.prune is None) every decoder layer in order, in place.

    With `config.layers_in_place` each layer is processed on the device it lives on (several
    GPUs through accelerate's device_map); otherwise it visits `config.device` and goes back.
    ``before_layer(i, layer, hidden, call, config)`` sees each layer on its device with its inputs
    before it is processed (the allocation pass measures the dense layers with it).
    With a `state`, the first `state.done` layers take their pruned tensors and reports from it
    and are only propagated; every layer pruned here is saved to it once finished.
    """
    t_start = time.perf_counter()
    device = config.device
    store = config.store_device
    n = samples.shape[0]
    if n % config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} must divide nsamples {n}")

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return allocate_activations(shape, dtype, store, config.activations_dir, like_device=device)

    hidden, calls = capture_layer_inputs(model, layers, samples, config.batch_size, device, store,
                                         move_layers=not config.layers_in_place, allocate=allocate)
    dense = open_dense_stream(hidden, allocate) if config.tracks_dense_model else None
    reports: list[LayerReport] = []
    mask_seconds = 0.0
    out = allocate(tuple(hidden.shape), hidden.dtype)
    bar = open_bar(config.progress, "layers", len(layers), unit="layer")
    previous: torch.device | None = None
    for i, layer in enumerate(layers):
        if config.layers_in_place:
            layer_device = _layer_device(layer)
            if previous is not None and previous != layer_device:
                synchronize(previous)  # its asynchronous copies into `out` must land before another device reads
            if store != "cpu" and hidden.device != layer_device:  # activations follow the layers
                hidden, out = hidden.to(layer_device), out.to(layer_device)
                if dense is not None:
                    dense.to(layer_device)
        else:
            layer_device = torch.device(device)
            home = next(layer.parameters()).device
            layer.to(layer_device)
        call = LayerCall(args=to_device(calls[i].args, layer_device), kwargs=to_device(calls[i].kwargs, layer_device))
        if before_layer is not None:
            before_layer(i, layer, hidden, call, _with_device(config, layer_device))
        if state is not None and i < state.done:
            tensors, report = state.restore(i)
            if dense is not None:  # the layer is still dense here: advance the dense stream first
                propagate_restored(layer, dense.hidden, dense.out, call, config, layer_device)
            layer.load_state_dict(tensors, strict=True)
            propagate_restored(layer, hidden, out, call, config, layer_device)
            seconds = sum(lin.mask_seconds for lin in report.linears)
        else:
            report, seconds = process_layer(i, layer, hidden, out, call, config, str(layer_device), dense)
            if state is not None:
                state.save(i, layer_tensors(layer), report)
        mask_seconds += seconds
        previous = layer_device
        hidden, out = out, hidden
        if dense is not None:
            dense.swap()
        if not config.layers_in_place:
            layer.to(home)
        reports.append(report)
        if on_layer_done is not None:
            on_layer_done(report)
        bar.update(1)
    bar.close()
    if previous is not None:
        synchronize(previous)
    return DriverResult(reports, hidden, mask_seconds, time.perf_counter() - t_start)


def synchronize(device: torch.device | str) -> None:
    """Wait for queued CUDA work (asynchronous copies into pinned buffers) on `device`; no-op on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
