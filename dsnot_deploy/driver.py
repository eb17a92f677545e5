"""Layer-sequential driver (algorithms.md section 1, step 3).

For each decoder layer: a calibrate pass with hooks on its Linears (statistics), masks for
every Linear, then a propagate pass of the now-sparse layer whose outputs feed the next layer.
Only one layer's inputs/outputs and statistics are alive at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .capture import LayerCall, capture_layer_inputs, layer_output, to_device
from .config import PruneConfig
from .pruner import LinearReport, prune_linear
from .stats import ChannelStats, accumulate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverConfig:
    prune: PruneConfig | None  # None: run the layers without pruning (checks, dense baselines)
    batch_size: int = 1  # calibration sequences per forward; must divide nsamples
    device: str = "cpu"  # where each layer is processed
    offload_activations: bool = False  # keep the B x L x hidden buffers on CPU
    measure_error: bool = False  # collect H even when the method does not need it
    progress: bool = True


@dataclass
class LayerReport:
    index: int
    linears: list[LinearReport] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class DriverResult:
    layers: list[LayerReport]
    hidden: torch.Tensor  # outputs of the last decoder layer, (nsamples, L, hidden)
    mask_seconds: float
    seconds: float


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
            x = hidden[start : start + batch_size].to(device)
            y = layer_output(layer(x, *call.args, **call.kwargs))
            if out is not None:
                out[start : start + batch_size] = y.to(out.device, out.dtype)


def _calibrate(
    layer: nn.Module, linears: dict[str, nn.Linear], hidden: torch.Tensor, call: LayerCall,
    config: DriverConfig, with_hessian: bool,
) -> dict[str, ChannelStats]:
    """Statistics per Linear; Linears fed the same tensor share one ChannelStats."""
    stats: dict[str, ChannelStats] = {}
    seen: dict[int, tuple[torch.Tensor, ChannelStats]] = {}  # refs keep ids unique per batch

    def make_hook(name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if id(x) in seen:
                shared = seen[id(x)][1]
                stats.setdefault(name, shared)
                return
            st = stats.get(name)
            if st is None:
                st = ChannelStats(module.in_features, with_hessian, device=config.device)
                stats[name] = st
            seen[id(x)] = (x, st)
            accumulate(st, x.detach())

        return hook

    handles = [mod.register_forward_hook(make_hook(name)) for name, mod in linears.items()]
    try:
        with torch.no_grad():
            for start in range(0, hidden.shape[0], config.batch_size):
                x = hidden[start : start + config.batch_size].to(config.device)
                layer(x, *call.args, **call.kwargs)
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    return stats


def run_layers(
    model: nn.Module,
    layers: nn.ModuleList,
    samples: torch.Tensor,
    config: DriverConfig,
    on_layer_done: Callable[[LayerReport], None] | None = None,
) -> DriverResult:
    """Prune (or just run, when config.prune is None) every decoder layer in order, in place."""
    t_start = time.perf_counter()
    device = config.device
    store = "cpu" if config.offload_activations else device
    n = samples.shape[0]
    if n % config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} must divide nsamples {n}")
    hidden, calls = capture_layer_inputs(model, layers, samples, config.batch_size, device, store)
    prune = config.prune
    with_hessian = prune is not None and (prune.needs_hessian or config.measure_error)
    reports: list[LayerReport] = []
    mask_seconds = 0.0
    out = torch.empty_like(hidden)
    bar = tqdm(total=len(layers), desc="layers", unit="layer", disable=not config.progress)
    for i, layer in enumerate(layers):
        t_layer = time.perf_counter()
        home = next(layer.parameters()).device
        layer.to(device)
        call = LayerCall(args=to_device(calls[i].args, device), kwargs=to_device(calls[i].kwargs, device))
        report = LayerReport(index=i)
        if prune is not None:
            linears = _linears(layer)
            stats = _calibrate(layer, linears, hidden, call, config, with_hessian)
            for name, mod in linears.items():
                if name not in stats:  # a Linear the forward never called stays dense
                    log.warning("layer %d: %s was not called during calibration; left dense", i, name)
                    continue
                refine = linear_group(name) not in prune.skip_refine_groups
                new_weight, lrep = prune_linear(f"{i}.{name}", mod.weight, stats[name], prune, refine)
                mod.weight.data.copy_(new_weight.to(mod.weight.dtype))
                mask_seconds += lrep.mask_seconds
                report.linears.append(lrep)
            del stats
        _run_layer(layer, hidden, call, config.batch_size, device, out)
        hidden, out = out, hidden
        layer.to(home)
        report.seconds = time.perf_counter() - t_layer
        reports.append(report)
        if on_layer_done is not None:
            on_layer_done(report)
        bar.update(1)
    bar.close()
    return DriverResult(reports, hidden, mask_seconds, time.perf_counter() - t_start)

