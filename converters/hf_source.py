"""Read a Hugging Face checkpoint directory tensor by tensor, or a few rows at a time (safetensors).

Only files on disk are read: ``config.json``, ``model.safetensors`` or a sharded
``model.safetensors.index.json``, the tokenizer files, and - when the checkpoint comes from
``dsnot-deploy refine`` - ``sparsity.json`` and ``calibration_stats.safetensors``.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from dsnot_deploy.errors import UnsupportedModelError, UserInputError

logger = logging.getLogger(__name__)

MANIFEST_FILE = "sparsity.json"
STATS_FILE = "calibration_stats.safetensors"


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor lives, and its shape and dtype (read from the file header)."""

    name: str
    file: Path
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype string: F32, F16, BF16, ...
    offset: int = -1  # absolute byte offset of the data in ``file`` (-1: unknown, read through safetensors)

    @property
    def rows(self) -> int:
        """Length of the first axis (1 for a scalar): the unit `HFCheckpoint.read_rows` slices."""
        return self.shape[0] if self.shape else 1

    @property
    def row_numel(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n


@dataclass(frozen=True)
class HFCheckpoint:
    """A checkpoint directory; tensors are opened lazily and one at a time."""

    root: Path
    config: dict[str, Any] = field(repr=False)
    tensors: dict[str, TensorRef] = field(repr=False)

    @cached_property
    def text_config(self) -> dict[str, Any]:
        """The decoder's config: multimodal checkpoints nest it under ``text_config``."""
        return self.config.get("text_config") or self.config

    @property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise UnsupportedModelError(f"{self.root / 'config.json'} names no architecture ('architectures' is empty)")
        return str(archs[0])

    @cached_property
    def manifest(self) -> dict[str, Any] | None:
        """The refinement manifest written by `dsnot-deploy refine`, if any."""
        path = self.root / MANIFEST_FILE
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise UserInputError(f"{path} is not valid JSON: {exc}") from None

    def load(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bf16/f16 converted exactly)."""
        ref = self.tensors[name]
        if ref.offset < 0 or ref.dtype not in _RAW_DTYPES:
            from safetensors import safe_open

            with safe_open(ref.file, framework="pt") as fh:
                tensor = fh.get_tensor(name)
            return tensor.float().numpy()
        return self.read_rows(name, 0, ref.rows).reshape(ref.shape)

    def read_raw_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a F32/F16/BF16 tensor as stored (BF16 as uint16), shape (rows, row_numel).

        Read with plain file reads into a fresh buffer, not a memory map: the pages go to the OS cache,
        not to this process's resident set, so reading a whole model costs one chunk of memory.
        """
        ref = self.tensors[name]
        dtype = _RAW_DTYPES[ref.dtype]
        n_rows, width = stop - start, ref.row_numel
        out = np.empty((n_rows, width), dtype=dtype)
        with open(ref.file, "rb", buffering=0) as fh:
            fh.seek(ref.offset + start * width * dtype.itemsize)
            view = memoryview(out).cast("B")
            got = 0
            while got < out.nbytes:
                n = fh.readinto(view[got:])
                if not n:
                    raise UserInputError(f"{ref.file} is truncated while reading {name}")
                got += n
        return out

    def count_zeros(self, name: str) -> tuple[int, int]:
        """(entries equal to zero, entries) of one tensor; -0.0 counts as zero. F32/F16/BF16 are
        counted on their stored bits (`stored_zero_count`), without converting to float32."""
        ref = self.tensors[name]
        if ref.offset < 0 or ref.dtype not in _RAW_DTYPES:
            arr = self.load(name)
            return int((arr == 0).sum()), int(arr.size)
        raw = self.read_raw_rows(name, 0, ref.rows)
        return stored_zero_count(raw), int(raw.size)

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of a F32/F16/BF16 tensor as float32 (exact), shape (rows, row_numel)."""
        return to_float32(self.read_raw_rows(name, start, stop), self.tensors[name].dtype)

    def load_stats(self) -> dict[str, np.ndarray]:
        """Per-Linear mean squared input (Wanda's sqnorm / n_tokens), keyed by module name."""
        from safetensors.numpy import load_file

        path = self.root / STATS_FILE
        if not path.is_file():
            return {}
        return {k: v.astype(np.float32) for k, v in load_file(path).items()}


_RAW_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


def stored_zero_count(raw: np.ndarray) -> int:
    """Exact zeros (either sign) among stored F32/F16/BF16 values (BF16 as uint16), from their bits."""
    bits = raw.view(np.uint32 if raw.dtype.itemsize == 4 else np.uint16)
    return int(np.count_nonzero((bits & (np.iinfo(bits.dtype).max >> 1)) == 0))


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored values (BF16 as uint16 bits) -> float32, exactly (torch's conversion, as safetensors loading had)."""
    import torch

    if dtype == "BF16":
        return torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16).float().numpy()
    if dtype == "F16":
        return torch.from_numpy(raw).float().numpy()
    return raw.astype(np.float32, copy=False)


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file, checked against the file size, and where the data starts."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise UserInputError(f"{path} is not a safetensors file (only {size} bytes)")
        n = int.from_bytes(raw, "little")
        if n <= 0 or 8 + n > size:
            raise UserInputError(f"{path} is truncated or not a safetensors file (header of {n} bytes, file {size})")
        try:
            header = json.loads(fh.read(n))
        except ValueError:
            raise UserInputError(f"{path} has a corrupt safetensors header") from None
    data_size = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info.get("data_offsets", (0, -1))
        if not 0 <= begin <= end <= data_size:
            raise UserInputError(f"{path} is truncated: tensor {key} ends at byte {end} of {data_size}")
    return header, 8 + n


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def open_checkpoint(root: str | Path) -> HFCheckpoint:
    """Index a checkpoint directory without reading any tensor data."""
    root = Path(root)
    if not root.exists():
        raise UserInputError(f"checkpoint {root} does not exist")
    if not root.is_dir():
        raise UserInputError(f"checkpoint {root} is not a directory (expected a Hugging Face checkpoint folder)")
    config_path = root / "config.json"
    if not config_path.is_file():
        raise UserInputError(f"{root} is not a Hugging Face checkpoint: it has no config.json")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as exc:
        raise UserInputError(f"{config_path} is not valid JSON: {exc}") from None
    index = root / "model.safetensors.index.json"
    if index.is_file():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError) as exc:
            raise UserInputError(f"{index} is not a valid safetensors index: {exc}") from None
        paths = [root / f for f in files]
    else:
        paths = sorted(root.glob("*.safetensors"))
        paths = [p for p in paths if p.name != STATS_FILE]
    if not paths:
        raise UserInputError(f"{root} holds no *.safetensors weights (other formats such as .bin are not read)")
    tensors: dict[str, TensorRef] = {}
    for path in paths:
        if not path.is_file():
            raise UserInputError(f"{path} is listed in the index but missing")
        header, data_start = _read_header(path)
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shape, dtype = tuple(int(d) for d in info["shape"]), str(info["dtype"])
            begin, end = info.get("data_offsets", (0, 0))
            sized = dtype in _RAW_DTYPES and end - begin == _RAW_DTYPES[dtype].itemsize * _numel(shape)
            tensors[name] = TensorRef(name, path, shape, dtype, data_start + begin if sized else -1)
    logger.debug("checkpoint %s: %d tensors in %d files", root, len(tensors), len(paths))
    return HFCheckpoint(root=root, config=config, tensors=tensors)
