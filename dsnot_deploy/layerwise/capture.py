"""Capture what each decoder layer receives (algorithms.md section 1, step 2).

Layer 0's hidden states are captured for every calibration batch (the forward stops there).
The other arguments (attention mask, position ids, rotary `position_embeddings`, ...) are
captured for *every* layer from one dense forward of the first batch, because layers may
receive different ones (Gemma 2/3 alternate sliding-window and global attention).  Nothing
is named per architecture.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from dsnot_deploy.errors import UnsupportedModelError


class _StopForward(Exception):
    """Raised from layer 0's pre-hook to end a forward once its input is captured."""


@dataclass(frozen=True)
class LayerCall:
    """Positional arguments after the hidden states, and keyword arguments, of one layer."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


_DROP_KWARGS = ("past_key_values", "past_key_value", "use_cache", "output_attentions")


def _map_tensors(fn: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """Apply `fn` to every tensor inside nested tuples/lists/dicts; other values pass through."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(fn, v) for v in value)
    if isinstance(value, list):
        return [_map_tensors(fn, v) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(fn, v) for k, v in value.items()}
    return value


def _detach(value: Any) -> Any:
    return _map_tensors(torch.Tensor.detach, value)


def to_device(value: Any, device: torch.device | str) -> Any:
    """Move every tensor inside nested tuples/lists/dicts to `device`."""
    return _map_tensors(lambda t: t.to(device), value)


def layer_output(output: Any) -> torch.Tensor:
    """A decoder layer returns its hidden states, alone or first in a tuple."""
    return output[0] if isinstance(output, tuple | list) else output


@contextmanager
def _layers_on(layers: nn.ModuleList, device: torch.device | str) -> Iterator[None]:
    """During a forward, move each layer to `device` just before it runs and back after."""
    handles = []
    homes: dict[int, torch.device] = {}

    def pre(module: nn.Module, args: Any) -> None:
        homes[id(module)] = next(module.parameters()).device
        module.to(device)

    def post(module: nn.Module, args: Any, output: Any) -> None:
        module.to(homes[id(module)])

    for layer in layers:
        handles.append(layer.register_forward_pre_hook(pre))
        handles.append(layer.register_forward_hook(post))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextmanager
def _layers_pass_through(layers: nn.ModuleList) -> Iterator[None]:
    """During a forward, every layer returns its hidden states unchanged without touching its weights.

    Forward pre-hooks still run (they see the arguments the model passes), so a model whose
    layers are still on the meta device can be "run" to record what each layer would receive.
    """
    def pass_through(*args: Any, **kwargs: Any) -> Any:
        return args[0] if args else kwargs["hidden_states"]

    for layer in layers:
        layer.forward = pass_through  # instance attribute: nn.Module.__call__ finds it first
    try:
        yield
    finally:
        for layer in layers:
            del layer.forward


Allocator = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def capture_layer_inputs(
    model: nn.Module,
    layers: nn.ModuleList,
    samples: torch.Tensor,
    batch_size: int,
    device: torch.device | str,
    store_device: torch.device | str,
    *,
    move_layers: bool = True,
    pass_through: bool = False,
    allocate: Allocator | None = None,
) -> tuple[torch.Tensor, list[LayerCall]]:
    """Return (hidden states entering layer 0: (nsamples, L, hidden), one LayerCall per layer).

    `samples` is (nsamples, L) token ids.  The model's non-layer modules must already be on
    `device`; layers may live elsewhere (they are visited on `device` for the one dense pass,
    unless `move_layers` is False: a model dispatched over several devices stays where it is).

    `pass_through=True` records every layer's arguments without running any layer (they return
    their input unchanged): the layers' weights may be on the meta device (streaming).  This is
    exact when the model computes the per-layer arguments (masks, rotary tables) before its
    layer loop from the inputs alone, as Hugging Face decoders do; tested on Llama, Qwen2, Qwen3
    and Gemma 3 against the dense pass.

    `allocate(shape, dtype)` gives the buffer the hidden states are written into (default: an
    empty tensor on `store_device`); e.g. a memory-mapped file for disk offload.
    """
    n = samples.shape[0]
    calls: list[LayerCall | None] = [None] * len(layers)
    buffer: list[torch.Tensor] = []
    position = 0
    stop_at_first = False
    last = len(layers) - 1

    def store_first(hidden: torch.Tensor) -> None:
        nonlocal position
        if not buffer:
            shape = (n, *hidden.shape[1:])
            buffer.append(allocate(shape, hidden.dtype) if allocate is not None
                          else torch.empty(shape, dtype=hidden.dtype, device=store_device))
        b = hidden.shape[0]
        buffer[0][position : position + b].copy_(hidden.detach())
        position += b

    def make_pre(i: int):
        def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not args and "hidden_states" not in kwargs:
                raise UnsupportedModelError(
                    "expected decoder layers called with the hidden states as first argument or "
                    f"`hidden_states=`; layer {i} got keywords {sorted(kwargs)}"
                )
            hidden = args[0] if args else kwargs["hidden_states"]
            if i == 0:
                store_first(hidden)
            if calls[i] is None:
                kw = {k: _detach(v) for k, v in kwargs.items() if k not in _DROP_KWARGS and k != "hidden_states"}
                calls[i] = LayerCall(args=_detach(tuple(args[1:])), kwargs=kw)
            if (i == 0 and stop_at_first) or (pass_through and i == last):
                raise _StopForward

        return pre

    handles = [layer.register_forward_pre_hook(make_pre(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = samples[start : start + batch_size].to(device)
                stop_at_first = start > 0
                try:
                    if start == 0 and pass_through:
                        with _layers_pass_through(layers):
                            model(input_ids=batch, use_cache=False)
                    elif start == 0 and move_layers:
                        with _layers_on(layers, device):
                            model(input_ids=batch, use_cache=False)
                    else:
                        model(input_ids=batch, use_cache=False)
                except _StopForward:
                    pass
    finally:
        for h in handles:
            h.remove()
    if any(c is None for c in calls):
        missing = [i for i, c in enumerate(calls) if c is None]
        raise UnsupportedModelError(f"decoder layers {missing} were never called by the model's forward")
    if position != n:
        raise UnsupportedModelError(f"expected {n} calibration sequences to reach decoder layer 0; {position} did")
    return buffer[0], [c for c in calls if c is not None]
