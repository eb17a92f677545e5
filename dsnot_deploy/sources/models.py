"""Loading decoder-only causal LMs from any model spec (``dsnot_deploy.sources.specs``).

``load_model`` turns a spec into a plain float ``PreTrainedModel`` in eval mode plus its tokenizer
(a GGUF is dequantized by transformers); ``load_model_dispatched`` places it over several devices;
``find_decoder_layers`` finds the ``nn.ModuleList`` of decoder blocks. Saving is in
``checkpoint_io``, layer-by-layer streaming in ``streaming_io``.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dsnot_deploy.errors import UnsupportedModelError, UserInputError
from dsnot_deploy.sources.specs import ModelSource, resolve_model_source

logger = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

@dataclass(frozen=True)
class LoadedModel:
    """A float causal LM in eval mode (``use_cache`` off), its tokenizer and where it came from."""

    model: Any  # transformers.PreTrainedModel
    tokenizer: Any  # transformers.PreTrainedTokenizerBase
    source: ModelSource


def one_line(error: BaseException) -> str:
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
        tokenizer = tokenizer_for_source(source, gguf_file=source.gguf_file)
    else:
        model = _load_hf_model(source, dtype)
        tokenizer = tokenizer_for_source(source)
    try:
        model = model.to(target)
    except (RuntimeError, AssertionError) as error:
        raise UserInputError(f"could not move the model to device {device!r}: {one_line(error)}") from error
    model.eval()
    model.config.use_cache = False
    logger.info(
        "loaded %s: %s, %d parameters",
        source.describe(),
        type(model).__name__,
        sum(p.numel() for p in model.parameters()),
    )
    return LoadedModel(model=model, tokenizer=tokenizer, source=source)


def load_failure(source: ModelSource, what: str, error: BaseException) -> UserInputError:
    hint = ""
    if source.kind == "hub":
        hint = " (treated as a Hugging Face Hub id because no such local path exists)"
    return UserInputError(f"could not load the {what} from {source.describe()}{hint}: {one_line(error)}")


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


def check_safetensors_dir(directory: Path) -> None:
    for path in sorted(Path(directory).glob("*.safetensors")):
        check_safetensors_file(path)


def _load_hf_model(source: ModelSource, dtype: torch.dtype) -> Any:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        config = AutoConfig.from_pretrained(source.location)
    except Exception as error:  # noqa: BLE001 - loader boundary: any failure is the user's input
        raise load_failure(source, "model config", error) from error
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise UnsupportedModelError(
            f"expected a checkpoint of a causal language model (loadable by AutoModelForCausalLM); "
            f"found model_type {getattr(config, 'model_type', '?')!r} ({type(config).__name__}) in {source.describe()}"
        )
    if source.kind == "local-dir":
        try:
            check_safetensors_dir(Path(source.location))
        except UserInputError as error:
            raise UserInputError(f"could not load the model weights from {source.describe()}: {error}") from None
    try:
        return AutoModelForCausalLM.from_pretrained(source.location, config=config, dtype=dtype)
    except Exception as error:  # noqa: BLE001
        raise load_failure(source, "model weights", error) from error


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
                             f"({one_line(error)})") from error
    try:
        # dequantize=True: never keep weights packed (GgufLinear), whatever kernels are installed.
        loaded = AutoModelForCausalLM.from_pretrained(
            source.location,
            gguf_file=source.gguf_file,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except Exception as error:  # noqa: BLE001
        raise load_failure(source, "GGUF model", error) from error

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


def tokenizer_for_source(source: ModelSource, gguf_file: str | None = None) -> Any:
    from transformers import AutoTokenizer

    kwargs = {"gguf_file": gguf_file} if gguf_file is not None else {}
    try:
        return AutoTokenizer.from_pretrained(source.location, **kwargs)
    except Exception as error:  # noqa: BLE001
        raise load_failure(source, "tokenizer", error) from error


def text_config(model: nn.Module) -> Any:
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
    cfg = text_config(model)
    n_layers = getattr(cfg, "num_hidden_layers", None) if cfg is not None else None
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
        tokenizer = tokenizer_for_source(source, gguf_file=source.gguf_file)
        if isinstance(device_map, str):
            device_map = infer_auto_device_map(model, no_split_module_classes=model._no_split_modules or None)
        model = dispatch_model(model, device_map=device_map)
    else:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, device_map=device_map)
        except Exception as error:  # noqa: BLE001
            raise load_failure(source, "model weights", error) from error
        tokenizer = tokenizer_for_source(source)
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
