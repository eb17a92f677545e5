"""`refine --dry-run`: memory per device and expected time, from the model config alone.

The model is built on the meta device (no weight is read) to count its parameters and list
its Linears.  Memory is the sum of named terms (weights resident, activation buffers,
statistics, one forward's working set, one Linear's mask working set), each an upper bound
of what the driver allocates.  Time is work divided by rates measured on the target device
right now (a matmul in the model dtype, and one small refinement of the chosen kind), so the
estimate is only as good as those rates extrapolate (GPU kernels speed up with size, so large
models usually run faster than estimated).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from dsnot_deploy.algorithms.config import (
    Method,
    PruneConfig,
    Refinement,
    Solver,
    Update,
)
from dsnot_deploy.algorithms.reconstruct import solver_for

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
F32 = 4
_GATED = ("gate_proj", "up_proj", "w1", "w3")  # Linears fed the same tensor as a sibling


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs from a model, counted on its meta skeleton."""

    model_class: str
    n_layers: int
    hidden: int
    heads: int
    head_dim: int
    layer_params: int  # the largest decoder layer
    non_layer_params: int  # embeddings, final norm, head (tied tensors once)
    embed_params: int
    linears: tuple[tuple[str, int, int], ...]  # (name, rows, cols) in one layer
    stat_inputs: tuple[int, ...]  # input width of each distinct set of statistics in one layer

    @property
    def params(self) -> int:
        return self.n_layers * self.layer_params + self.non_layer_params

    @property
    def linear_params(self) -> int:
        return sum(r * c for _, r, c in self.linears)


def shape_of(skeleton: nn.Module) -> ModelShape:
    """Count parameters and Linears of a (meta) model; distinct inputs as the driver's hooks find them."""
    from dsnot_deploy.sources.models import find_decoder_layers

    path, layers = find_decoder_layers(skeleton)
    seen: set[int] = set()
    non_layer = 0
    for name, p in skeleton.named_parameters():
        if not name.startswith(path + ".") and id(p) not in seen:
            seen.add(id(p))
            non_layer += p.numel()
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    linears = tuple((n, m.out_features, m.in_features) for n, m in layers[0].named_modules()
                    if isinstance(m, nn.Linear))
    groups: dict[tuple[str, int], int] = {}
    for name, _rows, cols in linears:
        parent, _, leaf = name.rpartition(".")
        shares = leaf in ("q_proj", "k_proj", "v_proj") or leaf in _GATED
        key = (parent, cols) if shares else (name, cols)
        groups.setdefault(key, cols)
    config = getattr(skeleton, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    hidden = int(getattr(text, "hidden_size", 0) or linears[0][2])
    heads = int(getattr(text, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(text, "head_dim", 0) or hidden // heads)
    embed = skeleton.get_input_embeddings().weight.numel() if hasattr(skeleton, "get_input_embeddings") else 0
    return ModelShape(
        model_class=type(skeleton).__name__, n_layers=len(layers), hidden=hidden, heads=heads, head_dim=head_dim,
        layer_params=layer_params, non_layer_params=non_layer, embed_params=embed, linears=linears,
        stat_inputs=tuple(groups.values()),
    )


@dataclass(frozen=True)
class RunShape:
    """The job's sizes: calibration, dtype, where things live."""

    nsamples: int
    seqlen: int
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    stream: bool = False
    activations: str = "device"  # "device", "cpu" (host) or "disk"
    n_devices: int = 1  # several GPUs with a device_map (whole model resident)
    measure_error: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}; got {self.dtype!r}")
        if self.activations not in ("device", "cpu", "disk"):
            raise ValueError(f"activations must be device, cpu or disk; got {self.activations!r}")


@dataclass(frozen=True)
class Rates:
    """Measured throughputs of the target device."""

    matmul_flops: float  # FLOP/s of a matmul in the model dtype
    mask_seconds_per_unit: float  # refinement seconds per (row x column) of a Linear; 0 for none


@dataclass
class Estimate:
    memory: dict[str, dict[str, int]] = field(default_factory=dict)  # place -> term -> bytes
    seconds: dict[str, float] = field(default_factory=dict)  # term -> seconds
    shape: ModelShape | None = None
    run: RunShape | None = None

    def peak(self, place: str) -> int:
        return sum(self.memory.get(place, {}).values())

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


def _needs_hessian(prune: PruneConfig | None, measure_error: bool) -> bool:
    return prune is not None and (prune.needs_hessian or measure_error)


ACTIVATIONS = "activations (2 x nsamples x seqlen x hidden)"
DENSE_ACTIVATIONS = "the dense model's activations (2 x nsamples x seqlen x hidden)"


def estimate(shape: ModelShape, run: RunShape, prune: PruneConfig | None, rates: Rates) -> Estimate:
    """Memory per place (the processing device, 'host', 'disk') and time per term, in bytes and seconds."""
    b = DTYPE_BYTES[run.dtype]
    n_tok = run.nsamples * run.seqlen
    hessian = _needs_hessian(prune, run.measure_error)
    weights_all = shape.params * b
    layer = shape.layer_params * b
    act = 2 * n_tok * shape.hidden * b  # inputs and outputs of the current layer
    stats = sum(5 * c * F32 + (c * c * F32 if hessian else 0) for c in shape.stat_inputs) if prune else 0
    widest = max(r for _, r, _ in shape.linears)  # the intermediate width of an MLP, usually
    tok = run.batch_size * run.seqlen
    forward = tok * (6 * shape.hidden + 3 * widest) * b + run.batch_size * shape.heads * run.seqlen ** 2 * F32
    prune_work = 0
    if prune is not None:
        rows, cols = max(((r, c) for _, r, c in shape.linears), key=lambda rc: rc[0] * rc[1])
        copies = 6 if prune.refinement is not Refinement.NONE else 3
        prune_work = copies * rows * cols * F32
        if prune.method is Method.SPARSEGPT:
            prune_work += 2 * cols * cols * F32
    device = run.device
    on_device: dict[str, int] = {}
    host: dict[str, int] = {}
    disk: dict[str, int] = {"output checkpoint": weights_all}
    if run.stream:
        on_device["weights: one layer (or the embeddings during capture)"] = max(layer, shape.embed_params * b)
        host["one layer read from the shards"] = layer
    else:
        on_device["weights: whole model" + (f" / {run.n_devices} devices" if run.n_devices > 1 else "")] = (
            weights_all // max(run.n_devices, 1))
    place = on_device if run.activations == "device" else host if run.activations == "cpu" else disk
    place[ACTIVATIONS] = act
    if prune is not None and prune.matches_dense_model:  # the dense stream beside the pruned one
        place[DENSE_ACTIVATIONS] = act
        stats += sum(c * c * F32 for c in shape.stat_inputs)  # X^T Xd per distinct input
    on_device["float32 statistics of one layer" + (" (with H)" if hessian else "")] = stats
    on_device["one forward batch (attention scores: eager/math upper bound)"] = forward
    on_device["mask working set of the largest Linear"] = prune_work
    memory = {device: on_device, "host": host, "disk": disk}
    if torch.device(device).type == "cpu":  # host and device are one memory
        memory = {"cpu (host)": {**on_device, **host}, "disk": disk}

    passes = 2 if prune is not None else 1  # calibrate + propagate
    if prune is not None and prune.matches_dense_model:
        passes += 1  # the dense layer on the dense stream
    if prune is not None and prune.allocates:
        passes += 2  # the allocation's dense pass: statistics + propagation
    attn_flops = 4 * run.seqlen * shape.heads * shape.head_dim  # QK^T and AV per token
    fwd_flops = passes * n_tok * shape.n_layers * (2 * shape.linear_params + attn_flops)
    seconds = {"forward passes": fwd_flops / rates.matmul_flops}
    if hessian:
        seconds["statistics (X^T X)"] = shape.n_layers * sum(2 * n_tok * c * c for c in shape.stat_inputs) / (
            rates.matmul_flops)
    if prune is not None and prune.method is Method.SPARSEGPT:
        sgpt = sum(c ** 3 + 2 * r * c * c for _, r, c in shape.linears)
        seconds["SparseGPT"] = shape.n_layers * sgpt / rates.matmul_flops
    if prune is not None and prune.refinement is not Refinement.NONE:
        seconds[f"{prune.refinement.value} refinement"] = (
            shape.n_layers * shape.linear_params * rates.mask_seconds_per_unit)
    if prune is not None and prune.update is Update.ADMM:
        # ADMM: an eigendecomposition and 2 products per step; CG (wide Linears under the auto solver):
        # at most cg_iterations + 1 products and no factorisation
        rc = prune.reconstruct
        admm = sum(rc.rounds * 2 * r * c * c * (rc.cg_iterations + 1) if solver_for(c, rc) is Solver.CG else
                   10 * c ** 3 + rc.iterations * rc.rounds * 4 * r * c * c for _, r, c in shape.linears)
        seconds["reconstruction (ADMM)"] = shape.n_layers * admm / rates.matmul_flops
    if run.stream:
        seconds["reading/writing shards (not estimated: disk speed)"] = 0.0
    return Estimate(memory=memory, seconds=seconds, shape=shape, run=run)


def measure_rates(device: str, dtype: str, prune: PruneConfig | None, size: int = 1024) -> Rates:
    """Time a `size`^3 matmul in `dtype` and one refinement of a (128 x size) Linear on `device`."""
    from dsnot_deploy.layerwise.driver import synchronize

    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device, torch_dtype)
    a @ a  # warm-up
    synchronize(device)
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 0.2:
        a @ a
        reps += 1
    synchronize(device)
    flops = reps * 2 * size ** 3 / (time.perf_counter() - t0)
    per_unit = 0.0
    if prune is not None and prune.refinement is not Refinement.NONE:
        per_unit = _mask_rate(device, prune, size, gen)
    return Rates(matmul_flops=flops, mask_seconds_per_unit=per_unit)


def _mask_rate(device: str, prune: PruneConfig, cols: int, gen: torch.Generator) -> float:
    from dsnot_deploy.algorithms.stats import ChannelStats, accumulate
    from dsnot_deploy.layerwise.linear import prune_linear

    rows = 128
    weight = torch.randn(rows, cols, generator=gen).to(device)
    stats = ChannelStats(cols, True, device=device)
    accumulate(stats, torch.randn(4, 2 * cols, cols, generator=gen).to(device))
    probe = replace(prune, method=Method.WANDA)  # the refinement alone (SparseGPT is counted in FLOPs)
    _, report = prune_linear("probe", weight, stats, probe, refine=True)
    return report.mask_seconds / (rows * cols)


def estimate_for_spec(
    spec: str, run: RunShape, prune: PruneConfig | None, rates: Rates | None = None,
) -> Estimate:
    """Estimate for a model spec (checkpoint dir, Hub id, .gguf file or alias) from its config alone."""
    skeleton = _skeleton_for_spec(spec, run.dtype)
    rates = rates or measure_rates(run.device, run.dtype, prune)
    return estimate(shape_of(skeleton), run, prune, rates)


def _skeleton_for_spec(spec: str, dtype: str) -> Any:
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from dsnot_deploy.errors import UserInputError
    from dsnot_deploy.sources.models import DTYPES
    from dsnot_deploy.sources.specs import resolve_model_source

    source = resolve_model_source(spec)
    kwargs = {"gguf_file": source.gguf_file} if source.gguf_file is not None else {}
    try:
        config = AutoConfig.from_pretrained(source.location, **kwargs)
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
    except Exception as error:  # noqa: BLE001 - loader boundary
        raise UserInputError(f"could not build {source.describe()} from its config: {error}") from error
    model.tie_weights()
    return model


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def format_estimate(est: Estimate) -> str:
    """A plain-text report for the terminal."""
    assert est.shape is not None and est.run is not None
    s, r = est.shape, est.run
    lines = [
        f"dry run (nothing is read beyond config.json, nothing written): {s.model_class}, {s.n_layers} layers, "
        f"hidden {s.hidden}, {s.params / 1e9:.3f} B parameters ({_gb(s.params * DTYPE_BYTES[r.dtype])} in {r.dtype})",
        f"mode: {'streaming one layer at a time' if r.stream else 'whole model resident'}, device {r.device}"
        + (f" x {r.n_devices}" if r.n_devices > 1 else "") + f", activations on {r.activations}, "
        f"calibration {r.nsamples} x {r.seqlen} tokens, batch {r.batch_size}",
    ]
    for place, terms in est.memory.items():
        lines.append(f"{place}: peak about {_gb(est.peak(place))}")
        lines.extend(f"    {_gb(v):>10}  {k}" for k, v in terms.items() if v)
    lines.append(f"time: about {est.total_seconds:.0f} s ({est.total_seconds / max(s.n_layers, 1):.1f} s per layer)"
                 " from rates measured here just now")
    lines.extend(f"    {v:10.1f} s  {k}" for k, v in est.seconds.items())
    return "\n".join(lines)
