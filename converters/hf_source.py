"""Read a Hugging Face checkpoint directory tensor by tensor (memory-mapped safetensors).

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
        """One tensor as float32 numpy (bf16/f16 converted exactly), read from the mapped file."""
        from safetensors import safe_open

        ref = self.tensors[name]
        with safe_open(ref.file, framework="pt") as fh:
            tensor = fh.get_tensor(name)
        return tensor.float().numpy()

    def load_stats(self) -> dict[str, np.ndarray]:
        """Per-Linear mean squared input (Wanda's sqnorm / n_tokens), keyed by module name."""
        from safetensors.numpy import load_file

        path = self.root / STATS_FILE
        if not path.is_file():
            return {}
        return {k: v.astype(np.float32) for k, v in load_file(path).items()}


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file, checked against the file size."""
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
    return header


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
        for name, info in _read_header(path).items():
            if name == "__metadata__":
                continue
            tensors[name] = TensorRef(name, path, tuple(int(d) for d in info["shape"]), str(info["dtype"]))
    logger.debug("checkpoint %s: %d tensors in %d files", root, len(tensors), len(paths))
    return HFCheckpoint(root=root, config=config, tensors=tensors)
