"""Refuse a `refine` job that cannot fit, with the estimate, instead of dying out of memory later.

Before calibration, the memory the job will allocate is estimated per place with the same terms
as ``refine --dry-run`` (``estimate.estimate``: the two activation buffers of nsamples x seqlen x
hidden in the model dtype, one layer's float32 statistics, one forward batch's working set, the
mask working set of the largest Linear, the weights when they are not loaded yet) and compared
with what is available now:

- the CPU/host: ``psutil.virtual_memory().available`` (RAM that can be handed out without
  swapping, reclaimable page cache included);
- a CUDA device: the free memory of ``torch.cuda.mem_get_info``;
- disk: ``shutil.disk_usage(folder).free`` of the activation folder (``--offload-dir``) and of
  the output's folder (the checkpoint and the per-layer resume state).

Weights already loaded are already counted as used, so they are left out of the need.  The
terms are upper bounds (eager attention scores), so the check can refuse a job that would just
fit; ``--no-memory-check`` skips it.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.estimate import (
    ACTIVATIONS,
    DENSE_ACTIVATIONS,
    DTYPE_BYTES,
    ModelShape,
    Rates,
    RunShape,
    estimate,
)

log = logging.getLogger(__name__)

_WEIGHTS_RESIDENT = "weights: whole model"


def available_host_bytes() -> int:
    """RAM available to this process now (psutil's `available`; /proc/meminfo-free pages as a fallback)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil comes with accelerate; keep a fallback all the same
        import os

        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))


def available_device_bytes(device: str) -> int:
    """Free memory of a CUDA device now (torch.cuda.mem_get_info); the host's for the CPU."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    return available_host_bytes()


def available_disk_bytes(folder: Path) -> int:
    """Free bytes on the filesystem holding `folder` (or its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return int(shutil.disk_usage(folder).free)


@dataclass(frozen=True)
class PlaceNeed:
    """What one place (a device, the host, a disk folder) must hold, and what it has."""

    place: str
    terms: dict[str, int]
    available: int

    @property
    def needed(self) -> int:
        return sum(self.terms.values())

    @property
    def fits(self) -> bool:
        return self.needed <= self.available


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if abs(n) >= 1e8 else f"{n / 1e6:.1f} MB"


def memory_needs(
    shape: ModelShape, run: RunShape, prune: PruneConfig | None, *, weights_loaded: bool,
    output_parent: Path | None = None, activations_dir: Path | None = None, state_saved: bool = False,
) -> list[PlaceNeed]:
    """The need and availability of every place the job uses (see the module docstring)."""
    est = estimate(shape, run, prune, Rates(matmul_flops=1.0, mask_seconds_per_unit=0.0))
    b = DTYPE_BYTES[run.dtype]
    needs: list[PlaceNeed] = []
    for place, terms in est.memory.items():
        if place == "disk":
            continue
        kept = {k: v for k, v in terms.items() if v and not (weights_loaded and k.startswith(_WEIGHTS_RESIDENT))}
        if place == "host" or place.startswith("cpu"):
            available = available_host_bytes()
        else:
            available = available_device_bytes(place)
        needs.append(PlaceNeed(place, kept, available))
    disk: dict[Path, dict[str, int]] = {}
    if activations_dir is not None and run.activations == "disk":
        disk[Path(activations_dir)] = {k: v for k, v in est.memory["disk"].items()
                                       if k in (ACTIVATIONS, DENSE_ACTIVATIONS)}
    if output_parent is not None:
        terms = disk.setdefault(Path(output_parent), {})
        terms["output checkpoint"] = shape.params * b
        if state_saved:
            terms["resume state (every pruned layer)"] = shape.n_layers * shape.layer_params * b
    same: dict[int, PlaceNeed] = {}
    for folder, terms in disk.items():  # folders on one filesystem share its free space
        key = _device_id(folder)
        if key in same:
            merged = {**same[key].terms, **terms}
            same[key] = PlaceNeed(same[key].place, merged, same[key].available)
        else:
            same[key] = PlaceNeed(f"disk ({folder})", terms, available_disk_bytes(folder))
    return needs + list(same.values())


def _device_id(folder: Path) -> int:
    folder = Path(folder).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder.stat().st_dev


def check_fits(
    shape: ModelShape, run: RunShape, prune: PruneConfig | None, *, weights_loaded: bool,
    output_parent: Path | None = None, activations_dir: Path | None = None, state_saved: bool = False,
) -> list[PlaceNeed]:
    """Raise UserInputError naming the estimate and the available amount when a place cannot hold the job."""
    needs = memory_needs(shape, run, prune, weights_loaded=weights_loaded, output_parent=output_parent,
                         activations_dir=activations_dir, state_saved=state_saved)
    for need in needs:
        log.debug("memory: %s needs %s of %s available: %s", need.place, _gb(need.needed), _gb(need.available),
                  {k: _gb(v) for k, v in need.terms.items()})
    for need in needs:
        if need.fits:
            continue
        act = 2 * run.nsamples * run.seqlen * shape.hidden * DTYPE_BYTES[run.dtype]
        biggest = sorted(need.terms.items(), key=lambda kv: -kv[1])[:3]
        parts = ", ".join(f"{k} {_gb(v)}" for k, v in biggest)
        if need.place.startswith("disk"):
            hint = "free some space, or choose another --offload-dir / output folder"
        else:
            hint = ("use --offload-activations (activations in host memory), --offload-dir DIR (on disk), "
                    "--stream (one layer of weights at a time), a smaller --nsamples or --seqlen, or "
                    "--no-memory-check to try anyway")
        raise UserInputError(
            f"expected the job to fit in {need.place}: it needs about {_gb(need.needed)} ({parts}; activations "
            f"2 x {run.nsamples} x {run.seqlen} x {shape.hidden} x {run.dtype} = {_gb(act)}) but only "
            f"{_gb(need.available)} is available; {hint}")
    return needs
