"""Per-layer state of a `refine` run, so that `refine --resume` continues after an interruption.

The state lives in the hidden folder ``.OUTDIR.resume`` next to OUTDIR:

- ``layer-00000.safetensors``, ... : for each finished decoder layer, its pruned tensors (the layer's
  whole ``state_dict``), its per-Linear input statistics (keys ``input_sq_mean/<linear>``) and its
  report (JSON in the file's metadata).  Written to a temporary name, fsynced, renamed.
- ``state.json``, written last after each layer: how many layers are finished, the job's settings
  and their SHA-256 fingerprint.  A resume whose settings differ is refused, naming the settings.
- ``lock``: an exclusive ``flock`` held while a run uses the folder (the kernel releases it when
  the process dies, even by SIGKILL), so two runs never write the same state.

The activations entering the first unfinished layer are not stored (they are nsamples x seqlen x
hidden, often larger than a layer): a resumed run recomputes them by running the finished, pruned
layers forward from the saved weights with exactly the code and batch split of the original run,
which gives the same bits on the same device and software (see docs/reliability.md).

The folder is removed once the output checkpoint is in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from dsnot_deploy.algorithms.pruner import LinearReport
from dsnot_deploy.atomic import atomic_write_bytes
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.driver import LayerReport
from dsnot_deploy.quant.report import QuantReport

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
STATE_VERSION = 1
_STATS_PREFIX = "input_sq_mean/"
_REPORT_KEY = "dsnot.layer_report"


def state_dir_for(outdir: Path) -> Path:
    """The state folder of a run writing OUTDIR: ``.OUTDIR.resume`` in the same parent folder."""
    outdir = Path(outdir).expanduser().absolute()
    return outdir.parent / f".{outdir.name}.resume"


def fingerprint(settings: dict[str, Any]) -> str:
    """SHA-256 of the settings as canonical JSON (sorted keys)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def tensor_sha256(tensor: torch.Tensor) -> str:
    """SHA-256 of a CPU tensor's bytes (e.g. the calibration token ids), with its dtype and shape."""
    t = tensor.detach().to("cpu").contiguous()
    h = hashlib.sha256(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def files_identity(path: Path | None) -> list[list[Any]]:
    """(name, size, mtime_ns) of a model file, or of every file directly inside a model folder.

    Detects a model that was replaced or re-saved between the interrupted run and the resume
    without reading the weights.
    """
    if path is None:
        return []
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else []
    out = []
    for f in files:
        st = f.stat()
        out.append([f.name, st.st_size, st.st_mtime_ns])
    return out


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [k for k in keys if json.dumps(old.get(k), sort_keys=True, default=str)
            != json.dumps(new.get(k), sort_keys=True, default=str)]


def _report_to_json(report: LayerReport) -> str:
    return json.dumps({"index": report.index, "seconds": report.seconds,
                       "linears": [asdict(lin) for lin in report.linears],
                       "quant": [asdict(q) for q in report.quant]})


def _report_from_json(text: str, stats: dict[str, torch.Tensor]) -> LayerReport:
    data = json.loads(text)
    return LayerReport(index=int(data["index"]), linears=[LinearReport(**lin) for lin in data["linears"]],
                       seconds=float(data["seconds"]), input_sq_mean=stats,
                       quant=[QuantReport(**q) for q in data.get("quant", [])])


class RefineState:
    """The resume state of one refine job (see the module docstring).

    Use ``RefineState.open``; ``done`` is the number of finished layers (0 for a fresh run).
    ``save`` after each finished layer, ``restore`` for each finished layer on resume, ``remove``
    once the output is in place, ``close`` (keeps the files) on a failure.
    """

    def __init__(self, folder: Path, settings: dict[str, Any], n_layers: int, done: int, lock_fd: int) -> None:
        self.folder = folder
        self.settings = settings
        self.n_layers = n_layers
        self.done = done
        self._lock_fd: int | None = lock_fd

    @classmethod
    def open(cls, outdir: Path, settings: dict[str, Any], n_layers: int, resume: bool, force: bool) -> RefineState:
        """Lock the state folder of OUTDIR and read what an earlier run finished.

        - A saved state with ``resume``: continue it, if its settings fingerprint matches (else
          UserInputError naming the settings that differ).
        - A saved state without ``resume``: UserInputError, unless ``force`` (then it is discarded).
        - No saved state: a fresh start (``resume`` then only logs that there was nothing to resume).
        """
        folder = state_dir_for(outdir)
        state_path = folder / STATE_FILE
        try:
            folder.mkdir(exist_ok=True)
            lock_fd = os.open(folder / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserInputError(f"cannot write the resume state in {folder}: {exc.strerror}") from None
        import fcntl

        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(lock_fd)
            raise UserInputError(f"expected no other run writing {outdir}; found its state folder {folder} locked "
                                 f"by another running dsnot-deploy refine") from None
        try:
            done = cls._read_done(folder, state_path, settings, n_layers, resume, force)
        except BaseException:
            os.close(lock_fd)
            raise
        state = cls(folder, settings, n_layers, done, lock_fd)
        if done:
            log.info("resuming: %d of %d layers finished in the interrupted run (state %s)", done, n_layers, folder)
        elif resume:
            log.info("--resume: no finished layer saved in %s; starting from layer 0", folder)
        else:
            state._clear_layers()
        state._write_state()
        return state

    @staticmethod
    def _read_done(folder: Path, state_path: Path, settings: dict[str, Any], n_layers: int, resume: bool,
                   force: bool) -> int:
        if not state_path.is_file():
            return 0
        try:
            saved = json.loads(state_path.read_text())
            saved_done = int(saved["layers_done"])
            saved_settings = dict(saved["settings"])
            saved_print = str(saved["fingerprint"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if resume:
                raise UserInputError(f"expected a readable resume state in {state_path}; found it damaged ({exc}); "
                                     f"delete {folder} to start over") from None
            saved_done, saved_settings, saved_print = 0, {}, ""
        if not resume:
            if saved_done and not force:
                raise UserInputError(
                    f"found the state of an interrupted run ({saved_done} of {saved.get('n_layers', '?')} layers "
                    f"finished) in {folder}; pass --resume to continue it, or --force to discard it and start over")
            if saved_done:
                log.warning("discarding the state of an interrupted run (%d layers finished) in %s (--force)",
                            saved_done, folder)
            return 0
        if saved_print != fingerprint(settings) or int(saved.get("n_layers", -1)) != n_layers:
            diff = _differences(saved_settings, settings) or ["n_layers"]
            raise UserInputError(
                f"expected the same settings as the interrupted run to resume it; found {', '.join(diff)} "
                f"different (state in {folder}); rerun with the original settings, or without --resume and "
                f"with --force to start over")
        if not 0 <= saved_done <= n_layers:
            raise UserInputError(f"expected 0..{n_layers} finished layers in {state_path}; found {saved_done}")
        for i in range(saved_done):
            if not (folder / _layer_file(i)).is_file():
                raise UserInputError(f"expected {_layer_file(i)} in {folder} (state says {saved_done} layers are "
                                     f"finished); found it missing - delete {folder} to start over")
        return saved_done

    def _clear_layers(self) -> None:
        for p in self.folder.iterdir():
            if p.name.startswith("layer-") or p.name.startswith("."):
                p.unlink(missing_ok=True)

    def _write_state(self) -> None:
        payload = {"version": STATE_VERSION, "fingerprint": fingerprint(self.settings), "n_layers": self.n_layers,
                   "layers_done": self.done, "settings": self.settings}
        atomic_write_bytes(self.folder / STATE_FILE, (json.dumps(payload, indent=1, default=str) + "\n").encode())

    def save(self, index: int, tensors: dict[str, torch.Tensor], report: LayerReport) -> None:
        """Record layer `index` as finished: its tensors, statistics and report, then state.json."""
        from safetensors.torch import save

        if index != self.done:
            raise ValueError(f"layers are saved in order: expected layer {self.done}, got {index}")
        payload = {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}
        for name, values in report.input_sq_mean.items():
            payload[_STATS_PREFIX + name] = values.detach().to("cpu").contiguous().clone()
        data = save(payload, metadata={_REPORT_KEY: _report_to_json(report)})
        try:
            atomic_write_bytes(self.folder / _layer_file(index), data)
            self.done = index + 1
            self._write_state()
        except OSError as exc:
            raise UserInputError(f"could not write the resume state in {self.folder}: {exc.strerror}") from None

    def restore(self, index: int) -> tuple[dict[str, torch.Tensor], LayerReport]:
        """The tensors (layer state_dict names) and report saved for finished layer `index`."""
        from safetensors import safe_open

        if not 0 <= index < self.done:
            raise ValueError(f"layer {index} is not finished in the saved state ({self.done} are)")
        path = self.folder / _layer_file(index)
        try:
            with safe_open(path, framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                loaded = {name: fh.get_tensor(name) for name in fh.keys()}
            report_json = meta[_REPORT_KEY]
        except Exception as exc:  # noqa: BLE001 - a damaged state file is the user's to delete
            raise UserInputError(f"expected a readable resume state file {path}; found it damaged ({exc}); "
                                 f"delete {self.folder} to start over") from None
        stats = {k[len(_STATS_PREFIX):]: v for k, v in loaded.items() if k.startswith(_STATS_PREFIX)}
        tensors = {k: v for k, v in loaded.items() if not k.startswith(_STATS_PREFIX)}
        return tensors, _report_from_json(report_json, stats)

    def close(self) -> None:
        """Release the lock and keep the files (a later --resume continues from them)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def remove(self) -> None:
        """Delete the state folder (the output is complete) and release the lock."""
        shutil.rmtree(self.folder, ignore_errors=True)
        self.close()


def _layer_file(index: int) -> str:
    return f"layer-{index:05d}.safetensors"
