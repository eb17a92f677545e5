"""Streaming checkpoints: a model skeleton on the meta device, safetensors read and written one
decoder layer at a time (memory-mapped reads, sharded atomic writes)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsnot_deploy.atomic import (
    exists_message,
    remove_tree,
    replace_into_place,
    temporary_path,
)
from dsnot_deploy.errors import UnsupportedModelError, UserInputError
from dsnot_deploy.sources.checkpoint_io import (
    checked_relative,
    fsync_path,
    fsync_tree,
    verify_tokenizer_reload,
)
from dsnot_deploy.sources.models import (
    check_safetensors_dir,
    load_failure,
    one_line,
    tokenizer_for_source,
)
from dsnot_deploy.sources.specs import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"


def streamable_checkpoint_dir(spec: str) -> tuple[ModelSource, Path]:
    """The local directory of a safetensors checkpoint for ``spec`` (a Hub id is fetched, weights as safetensors).

    GGUF files and aliases cannot stream: their tensors are quantized blocks that transformers
    dequantizes whole, in memory.  They raise a ``UserInputError`` that names the way out.
    """
    source = resolve_model_source(spec)
    if source.gguf_file is not None:
        raise UserInputError(
            f"expected a safetensors checkpoint (directory or Hub id) to stream layer by layer; found the GGUF "
            f"model {source.describe()}, which can only be dequantized whole in memory - run refine without "
            f"--stream, or convert it once to a safetensors checkpoint and stream that"
        )
    if source.kind == "hub":
        try:
            from huggingface_hub import snapshot_download

            location = Path(snapshot_download(
                source.location,
                allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"],
            ))
        except Exception as error:  # noqa: BLE001 - loader boundary
            raise load_failure(source, "safetensors checkpoint", error) from error
    else:
        location = Path(source.location)
    if not ((location / SAFETENSORS_INDEX).is_file() or (location / SAFETENSORS_SINGLE).is_file()):
        raise UserInputError(
            f"expected {SAFETENSORS_SINGLE} or {SAFETENSORS_INDEX} in {location} to stream layer by layer; found "
            f"{sorted(p.name for p in location.iterdir())[:12]} - run refine without --stream"
        )
    return source, location


@dataclass(frozen=True)
class SafetensorsCheckpoint:
    """The tensors of a (possibly sharded) safetensors checkpoint: name -> file, read lazily."""

    directory: Path
    weight_map: dict[str, str]  # tensor name -> file name inside `directory`

    @classmethod
    def open(cls, directory: Path) -> SafetensorsCheckpoint:
        """Read the index (or the single file's header); no tensor data is read."""
        import json

        from safetensors import safe_open

        directory = Path(directory)
        index = directory / SAFETENSORS_INDEX
        check_safetensors_dir(directory)
        try:
            if index.is_file():
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            else:
                with safe_open(directory / SAFETENSORS_SINGLE, framework="pt", device="cpu") as handle:
                    weight_map = {name: SAFETENSORS_SINGLE for name in handle.keys()}
        except Exception as error:  # noqa: BLE001 - a broken file is the user's input
            raise UserInputError(f"could not read the safetensors index of {directory}: {one_line(error)}") from error
        missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
        if missing:
            raise UserInputError(f"expected the shards named by {index.name} in {directory}; found {missing[:3]} missing")
        return cls(directory=directory, weight_map=weight_map)

    def load(
        self, names: list[str], device: torch.device | str, dtypes: dict[str, torch.dtype],
        shapes: dict[str, torch.Size] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Read `names` (memory-mapped, one shard open at a time), cast to `dtypes[name]`, copy to `device`.

        The returned tensors own their memory (the mapping is released when the shard closes).
        """
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise UserInputError(f"expected tensor {name!r} in the checkpoint {self.directory}; it is not there")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for filename, file_names in by_file.items():
            try:
                with safe_open(self.directory / filename, framework="pt", device="cpu") as handle:
                    for name in file_names:
                        mapped = handle.get_tensor(name)
                        if shapes is not None and mapped.shape != shapes[name]:
                            raise UserInputError(
                                f"expected tensor {name!r} of shape {tuple(shapes[name])} (from config.json); "
                                f"found {tuple(mapped.shape)} in {filename}"
                            )
                        out[name] = mapped.to(device=device, dtype=dtypes[name], copy=True)
                        del mapped
            except UserInputError:
                raise
            except Exception as error:  # noqa: BLE001 - a broken shard is the user's input
                raise UserInputError(f"could not read {filename} in {self.directory}: {one_line(error)}") from error
        return out


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer of a local checkpoint directory."""
    return tokenizer_for_source(ModelSource(kind="local-dir", location=str(directory), spec=str(directory)))


def build_skeleton(directory: Path, dtype: torch.dtype) -> Any:
    """The causal LM of ``directory/config.json`` with every parameter on the meta device.

    Buffers (rotary tables, embedding scales) are real CPU tensors, computed as a normal load
    computes them (accelerate's ``init_empty_weights(include_buffers=False)``).  Eval mode,
    ``use_cache`` off.  No weight is read.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    source = ModelSource(kind="local-dir", location=str(directory), spec=str(directory))
    try:
        config = AutoConfig.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001
        raise load_failure(source, "model config", error) from error
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(
            f"expected a checkpoint of a causal language model (loadable by AutoModelForCausalLM); "
            f"found model_type {getattr(config, 'model_type', '?')!r} ({type(config).__name__}) in {directory}"
        )
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # tied parameters become one object, as after from_pretrained
    model.eval()
    model.config.use_cache = False
    return model


def load_generation_config(directory: Path, model: Any) -> Any:
    """``generation_config.json`` of ``directory`` when present, else the model's own (None if it cannot generate)."""
    from transformers import GenerationConfig

    if not model.can_generate():
        return None
    if (Path(directory) / "generation_config.json").is_file():
        try:
            return GenerationConfig.from_pretrained(directory)
        except Exception as error:  # noqa: BLE001
            logger.warning("ignoring unreadable generation_config.json: %s", one_line(error))
    return getattr(model, "generation_config", None)


def shard_file_name(number: int, total: int) -> str:
    """Hugging Face's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class ShardedCheckpointWriter:
    """Write a Hugging Face checkpoint one shard at a time, atomically.

    Shards go into ``.OUTDIR.<pid>.d.tmp`` next to ``outdir`` as they are produced (each fsynced);
    ``commit`` adds ``model.safetensors.index.json``, the config, generation config and tokenizer
    (reload-checked), fsyncs, writes the manifest last and renames the folder into place, exactly
    as ``save_checkpoint`` does.  ``abort`` (or leaving the ``with`` block on an error) removes the
    temporary folder.  An existing ``outdir`` is replaced only with ``force``.
    """

    def __init__(self, outdir: Path, n_shards: int, force: bool = False) -> None:
        self.outdir = Path(outdir).expanduser().absolute()
        if (self.outdir.exists() or self.outdir.is_symlink()) and not force:
            raise UserInputError(exists_message(self.outdir))
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1; got {n_shards}")
        self.n_shards = n_shards
        self.force = force
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.written: set[int] = set()
        self.outdir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = temporary_path(self.outdir, "d")
        remove_tree(self.tmp)
        self.tmp.mkdir()

    def __enter__(self) -> ShardedCheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is not None:
            self.abort()

    def write_shard(self, number: int, tensors: dict[str, torch.Tensor]) -> None:
        """Write shard `number` (1-based) holding `tensors` (moved to the CPU, made contiguous)."""
        from safetensors.torch import save_file

        if not 1 <= number <= self.n_shards or number in self.written:
            raise ValueError(f"shard {number} is out of 1..{self.n_shards} or already written")
        name = shard_file_name(number, self.n_shards)
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        try:
            save_file(cpu, str(self.tmp / name), metadata={"format": "pt"})
            fsync_path(self.tmp / name)
        except OSError as error:
            raise UserInputError(f"could not write the checkpoint to {self.outdir}: {one_line(error)}") from error
        for key, value in cpu.items():
            self.weight_map[key] = name
            self.total_bytes += value.numel() * value.element_size()
        self.written.add(number)

    def write_extra(self, name: str, data: bytes) -> None:
        """One more file in the checkpoint folder (fsynced), e.g. calibration statistics."""
        target = self.tmp / checked_relative(name, "an extra file name")
        with open(target, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())

    def commit(
        self, config: Any, tokenizer: Any, generation_config: Any = None,
        manifest_name: str | None = None, manifest: bytes | None = None,
    ) -> None:
        """Index, config, tokenizer, fsync, manifest last, rename into place."""
        import json

        missing = sorted(set(range(1, self.n_shards + 1)) - self.written)
        if missing:
            raise ValueError(f"shards {missing} were never written")
        manifest_rel = checked_relative(manifest_name, "manifest_name") if manifest_name is not None else None
        try:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            config.save_pretrained(self.tmp)
            if generation_config is not None:
                generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
                verify_tokenizer_reload(tokenizer, self.tmp)
            fsync_tree(self.tmp)
            if manifest_rel is not None and manifest is not None:
                target = self.tmp / manifest_rel
                if target.exists():
                    raise UserInputError(f"expected manifest {manifest_name!r} not to overwrite a checkpoint file")
                with open(target, "wb") as handle:
                    handle.write(manifest)
                    handle.flush()
                    os.fsync(handle.fileno())
                fsync_path(target.parent)
            replace_into_place(self.tmp, self.outdir, self.force)
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError):
                raise UserInputError(f"could not write the checkpoint to {self.outdir}: {one_line(error)}") from error
            raise
        logger.info("saved checkpoint to %s", self.outdir)

    def abort(self) -> None:
        """Remove the temporary folder (nothing is left behind)."""
        remove_tree(self.tmp)
