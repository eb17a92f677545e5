"""Layer streaming: refine a safetensors checkpoint one decoder layer at a time.

The model is a skeleton on the meta device (``models.build_skeleton``); its weights stay in the
memory-mapped safetensors shards.  The steps:

1. The tensors outside the decoder layers (embeddings, final norm, head) are copied to the
   output shards first, one shard at a time.
2. Capture: the embeddings are loaded only when the forward calls them (lazy pre-hooks), the
   hidden states entering layer 0 are recorded for every calibration batch, and each layer's
   own arguments (masks, rotary tables: Gemma 3's differ per layer) are recorded from one
   forward in which the layers pass their input through untouched (``capture`` pass-through).
   The embeddings then go back to the meta device.
3. For each layer in order: its tensors are read from the shards, cast and moved to the
   device, the layer is calibrated, pruned and propagated by the same code as the in-memory
   driver (``driver.process_layer``), written to its own output shard, and freed.

Peak memory (device and host) is one layer + the two activation buffers + one layer's
statistics, whatever the depth; the buffers can live on the host or in files on disk.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from dsnot_deploy.errors import UnsupportedModelError
from dsnot_deploy.layerwise.capture import LayerCall, capture_layer_inputs, to_device
from dsnot_deploy.layerwise.dense_stream import open_dense_stream
from dsnot_deploy.layerwise.driver import (
    DriverConfig,
    DriverResult,
    LayerObserver,
    LayerReport,
    LayerStateStore,
    allocate_activations,
    layer_tensors,
    process_layer,
    propagate_restored,
    synchronize,
)
from dsnot_deploy.progress import open_bar
from dsnot_deploy.sources.models import find_decoder_layers
from dsnot_deploy.sources.streaming_io import (
    SafetensorsCheckpoint,
    ShardedCheckpointWriter,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamPlan:
    """Which checkpoint tensors go where: every name below is a tensor name of the checkpoint."""

    layers_path: str  # e.g. "model.layers"
    layer_names: tuple[tuple[str, ...], ...]  # per decoder layer, the tensors written to its shard
    other_shards: tuple[tuple[str, ...], ...]  # tensors outside the layers, packed into shards
    from_skeleton: tuple[str, ...]  # persistent buffers the checkpoint lacks (written as initialised)
    dtypes: dict[str, torch.dtype]
    shapes: dict[str, torch.Size]

    @property
    def n_shards(self) -> int:
        return len(self.other_shards) + len(self.layer_names)

    def layer_shard(self, index: int) -> int:
        """1-based shard number of decoder layer `index` (layers come after the other tensors)."""
        return len(self.other_shards) + index + 1


def _prefix(layers_path: str, index: int) -> str:
    return f"{layers_path}.{index}."


def plan_stream(skeleton: nn.Module, checkpoint: SafetensorsCheckpoint) -> StreamPlan:
    """Match the skeleton's state to the checkpoint's tensor names and pack the output shards.

    Tied parameters (e.g. ``lm_head.weight`` = ``model.embed_tokens.weight``) are written once,
    under the first of their names that the checkpoint has, as ``save_pretrained`` does.
    Checkpoint tensors the model does not use are dropped (with a warning), as a normal load does.
    """
    layers_path, layers = find_decoder_layers(skeleton)
    state = skeleton.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
    buffers = {name for name, _ in skeleton.named_buffers()}
    have = checkpoint.weight_map
    write: list[str] = []
    from_skeleton: list[str] = []
    missing: list[str] = []
    for names in groups.values():
        present = [n for n in names if n in have]
        if present:
            write.append(present[0])
        elif names[0] in buffers:
            from_skeleton.append(names[0])
        else:
            missing.append(names[0])
    if missing:
        raise UnsupportedModelError(
            f"expected the checkpoint's tensor names to match the model's parameters to stream it; found "
            f"{len(missing)} parameters missing, e.g. {missing[:4]} (checkpoint has e.g. {sorted(have)[:4]}) - "
            f"run refine without --stream"
        )
    unused = sorted(set(have) - set(state))
    if unused:
        log.warning("checkpoint tensors not used by %s are dropped: %s", type(skeleton).__name__, unused[:8])
    dtypes = {n: state[n].dtype for n in write + from_skeleton}
    shapes = {n: state[n].shape for n in write + from_skeleton}
    per_layer: list[list[str]] = [[] for _ in layers]
    others: list[str] = []
    for name in write + from_skeleton:
        for i in range(len(layers)):
            if name.startswith(_prefix(layers_path, i)):
                per_layer[i].append(name)
                break
        else:
            others.append(name)

    def nbytes(name: str) -> int:
        return state[name].numel() * state[name].element_size()

    limit = max((sum(nbytes(n) for n in names) for names in per_layer), default=1)
    shards: list[list[str]] = []
    size = 0
    for name in others:  # greedy packing, none bigger than the largest layer unless one tensor is
        if not shards or size + nbytes(name) > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes(name)
    return StreamPlan(
        layers_path=layers_path,
        layer_names=tuple(tuple(names) for names in per_layer),
        other_shards=tuple(tuple(names) for names in shards),
        from_skeleton=tuple(from_skeleton),
        dtypes=dtypes,
        shapes=shapes,
    )


def _set_tensor(root: nn.Module, name: str, device: torch.device | str, value: torch.Tensor | None = None) -> None:
    from accelerate.utils import set_module_tensor_to_device

    set_module_tensor_to_device(root, name, device, value=value)


def _free_to_meta(module: nn.Module, prefix: str = "") -> None:
    """Put every parameter of `module` back on the meta device (its memory is released)."""
    for name, _ in list(module.named_parameters(recurse=True)):
        _set_tensor(module, name, "meta")


@contextmanager
def _lazy_non_layer_weights(
    skeleton: nn.Module, plan: StreamPlan, checkpoint: SafetensorsCheckpoint, device: torch.device | str,
) -> Iterator[None]:
    """Load a non-layer module's parameters the first time the forward calls it; free them all after.

    Only what the forward reaches before layer 0 (the embeddings) is ever read; the final norm
    and the head are never called during the capture, so they never leave the disk.
    """
    tied_source: dict[int, str] = {}
    for name, tensor in skeleton.state_dict(keep_vars=True).items():
        if name in plan.dtypes:
            tied_source.setdefault(id(tensor), name)
    layer_prefix = plan.layers_path + "."
    loaded: list[tuple[nn.Module, str]] = []
    handles = []

    def make_hook(module: nn.Module, module_name: str) -> Callable:
        def hook(mod: nn.Module, args: object) -> None:
            for pname, param in list(mod.named_parameters(recurse=False)):
                if param.device.type != "meta":
                    continue
                source = tied_source.get(id(param), f"{module_name}.{pname}" if module_name else pname)
                tensor = checkpoint.load([source], device, {source: plan.dtypes[source]},
                                         {source: plan.shapes[source]})[source]
                _set_tensor(mod, pname, device, value=tensor)
                loaded.append((mod, pname))

        return hook

    for module_name, module in skeleton.named_modules():
        if module_name.startswith(layer_prefix) or module_name == plan.layers_path:
            continue
        if any(True for _ in module.parameters(recurse=False)):
            handles.append(module.register_forward_pre_hook(make_hook(module, module_name)))
    for name, buffer in list(skeleton.named_buffers()):  # rotary tables, scales: small, needed on device
        if not name.startswith(layer_prefix) and buffer.device != torch.device(device):
            _set_tensor(skeleton, name, device)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mod, pname in loaded:
            _set_tensor(mod, pname, "meta")


def _write_other_shards(plan: StreamPlan, skeleton: nn.Module, checkpoint: SafetensorsCheckpoint,
                        writer: ShardedCheckpointWriter) -> tuple[int, int]:
    """Copy the non-layer tensors (cast to the model dtype) into their shards; return (zeros, numel)."""
    state = skeleton.state_dict()
    zeros = numel = 0
    for number, names in enumerate(plan.other_shards, start=1):
        from_ckpt = [n for n in names if n not in plan.from_skeleton]
        tensors = checkpoint.load(from_ckpt, "cpu", plan.dtypes, plan.shapes)
        tensors.update({n: state[n] for n in names if n in plan.from_skeleton})
        for t in tensors.values():
            zeros += int((t == 0).sum())
            numel += t.numel()
        writer.write_shard(number, tensors)
        del tensors
    return zeros, numel


def release_host_memory() -> None:
    """Give freed heap memory back to the OS (glibc `malloc_trim`); a no-op elsewhere.

    Without it, glibc keeps the freed pages of each streamed layer in its heap, fragmented, and
    the process's RSS creeps up by a few MB per layer although no tensor is alive (measured:
    about 3 MB per 4 MB layer on a 16-layer model; flat with the trim).
    """
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        import ctypes
        import ctypes.util

        _MALLOC_TRIM = False
        name = ctypes.util.find_library("c")
        if name:
            try:
                _MALLOC_TRIM = ctypes.CDLL(name).malloc_trim
            except (OSError, AttributeError):  # not glibc
                _MALLOC_TRIM = False
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None


def _buffers_to(layer: nn.Module, device: torch.device) -> None:
    """Move the layer's buffers (rotary tables, ...) that the checkpoint does not hold to `device`."""
    for name, buffer in list(layer.named_buffers()):
        if buffer.device != device:
            _set_tensor(layer, name, device)


def _check_restored(index: int, saved: dict[str, torch.Tensor], layer: nn.Module) -> None:
    expected = {name: t.shape for name, t in layer.state_dict().items()}
    found = {name: t.shape for name, t in saved.items()}
    if expected != found:
        raise ValueError(f"layer {index}: the resume state holds {sorted(found)[:4]}..., the model expects "
                         f"{sorted(expected)[:4]}... (shapes or names differ)")


@dataclass
class StreamResult:
    driver: DriverResult
    zeros: int  # exact zeros over every written tensor (tied tensors once)
    params: int  # elements over every written tensor


def stream_layers(
    skeleton: nn.Module,
    checkpoint: SafetensorsCheckpoint,
    samples: torch.Tensor,
    config: DriverConfig,
    writer: ShardedCheckpointWriter,
    plan: StreamPlan | None = None,
    on_layer_done: Callable[[LayerReport], None] | None = None,
    state: LayerStateStore | None = None,
    before_layer: LayerObserver | None = None,
) -> StreamResult:
    """Prune every decoder layer of the checkpoint in order, streaming it; write every output shard.

    `samples` is (nsamples, L) token ids.  The result's masks and weights equal those of
    ``driver.run_layers`` on the fully loaded model (same code per layer, same arguments).
    With a `state`, the first `state.done` layers are read from it (pruned) instead of the
    checkpoint and only propagated; every layer pruned here is saved to it once finished.
    """
    t_start = time.perf_counter()
    plan = plan or plan_stream(skeleton, checkpoint)
    if writer.n_shards != plan.n_shards:
        raise ValueError(f"writer expects {writer.n_shards} shards; the plan has {plan.n_shards}")
    _, layers = find_decoder_layers(skeleton)
    device = torch.device(config.device)
    store = config.store_device
    n = samples.shape[0]
    if n % config.batch_size:
        raise ValueError(f"batch_size {config.batch_size} must divide nsamples {n}")

    zeros, numel = _write_other_shards(plan, skeleton, checkpoint, writer)

    def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return allocate_activations(shape, dtype, store, config.activations_dir, like_device=device)

    with _lazy_non_layer_weights(skeleton, plan, checkpoint, device):
        hidden, calls = capture_layer_inputs(skeleton, layers, samples, config.batch_size, device, store,
                                             pass_through=True, allocate=allocate)
    out = allocate(tuple(hidden.shape), hidden.dtype)
    dense = open_dense_stream(hidden, allocate) if config.tracks_dense_model else None
    reports: list[LayerReport] = []
    mask_seconds = 0.0
    bar = open_bar(config.progress, "layers (streamed)", len(layers), unit="layer")
    for i, layer in enumerate(layers):
        prefix = _prefix(plan.layers_path, i)
        names = plan.layer_names[i]
        restored = state is not None and i < state.done
        call = LayerCall(args=to_device(calls[i].args, device), kwargs=to_device(calls[i].kwargs, device))
        if not restored or dense is not None:  # a restored layer's dense weights still feed the dense stream
            from_ckpt = [nm for nm in names if nm not in plan.from_skeleton]
            for name, tensor in checkpoint.load(from_ckpt, device, plan.dtypes, plan.shapes).items():
                _set_tensor(layer, name[len(prefix):], device, value=tensor)
            _buffers_to(layer, device)
        if restored:
            if dense is not None:
                propagate_restored(layer, dense.hidden, dense.out, call, config, device)
            saved, report = state.restore(i)
            _check_restored(i, saved, layer)
            for name, tensor in saved.items():
                _set_tensor(layer, name, device, value=tensor.to(device))
            _buffers_to(layer, device)
        if before_layer is not None:
            before_layer(i, layer, hidden, call, config)
        if restored:
            propagate_restored(layer, hidden, out, call, config, device)
            seconds = sum(lin.mask_seconds for lin in report.linears)
        else:
            report, seconds = process_layer(i, layer, hidden, out, call, config, str(device), dense)
            if state is not None:
                state.save(i, layer_tensors(layer), report)
        mask_seconds += seconds
        layer_state = layer.state_dict()
        tensors = {name: layer_state[name[len(prefix):]] for name in names}
        for t in tensors.values():
            zeros += int((t == 0).sum())
            numel += t.numel()
        writer.write_shard(plan.layer_shard(i), tensors)
        del tensors, layer_state, call
        _free_to_meta(layer)
        release_host_memory()
        hidden, out = out, hidden
        if dense is not None:
            dense.swap()
        reports.append(report)
        if on_layer_done is not None:
            on_layer_done(report)
        bar.update(1)
    bar.close()
    synchronize(device)
    result = DriverResult(reports, hidden, mask_seconds, time.perf_counter() - t_start)
    return StreamResult(driver=result, zeros=zeros, params=numel)
