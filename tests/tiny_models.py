"""Tiny, seeded, randomly initialised decoder models (and a tiny tokenizer) for fast tests.

Every architecture: hidden 64, intermediate 128, 2 layers, 4 query heads / 2 KV heads, head_dim 16,
vocab 128, float32, eager attention, eval mode.  Special token ids match ``make_tiny_tokenizer``:
0 ``<unk>``, 1 ``<s>`` (bos), 2 ``</s>`` (eos), 3 ``<pad>``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

ARCHS: tuple[str, ...] = ("llama", "qwen2", "qwen3", "gemma3")

TINY_VOCAB = 128
GEMMA3_SLIDING_WINDOW = 8

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>")

_CORPUS = (
    "Hello world, this is a tiny tokenizer for tests.",
    "The quick brown fox jumps over the lazy dog.",
    "Sparse models keep most of their quality when pruned with care.",
    "Pruning removes small weights; the rest of the layer is updated.",
    "A language model predicts the next token from the ones before it.",
    "hello world hello world the the a a of of and and",
    "ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz 0123456789 .,;:!?'\"()-\n\t",
)

_COMMON: dict[str, Any] = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=3,
)


def _config(arch: str, overrides: dict[str, Any]) -> Any:
    from transformers import Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    kwargs = dict(_COMMON)
    if arch == "llama":
        cls: Any = LlamaConfig
    elif arch == "qwen2":
        cls = Qwen2Config  # q/k/v projections carry biases
    elif arch == "qwen3":
        cls = Qwen3Config
    elif arch == "gemma3":
        cls = Gemma3TextConfig
        kwargs.update(
            sliding_window=GEMMA3_SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=16,
        )
    else:
        raise ValueError(f"unknown tiny arch {arch!r}; expected one of {ARCHS}")
    kwargs.update(overrides)
    if arch == "gemma3" and "layer_types" not in overrides:
        n = kwargs["num_hidden_layers"]
        kwargs["layer_types"] = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    return cls(**kwargs)


def make_tiny_model(arch: str, seed: int = 0, **overrides: Any) -> PreTrainedModel:
    """A seeded tiny causal LM of ``arch`` (one of ``ARCHS``); ``overrides`` go to the config."""
    from transformers import AutoModelForCausalLM

    config = _config(arch, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        # Linear biases (qwen2's q/k/v) start at zero; make them matter.
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("proj.bias"):
                    param.normal_(0.0, config.initializer_range)
    model.eval()
    return model


def make_tiny_tokenizer() -> Any:
    """A small byte-level BPE tokenizer (vocab <= 128) wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # Byte-level like GPT-2/Qwen/Llama-3 (so transformers' Qwen2Tokenizer, which rebuilds a byte-level
    # pipeline around the saved vocab for model_type qwen2, reloads it identically), but with an
    # alphabet limited to the bytes of the corpus to stay under the model's vocab.
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=120, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=[], show_progress=False
    )
    backend.train_from_iterator(_CORPUS, trainer=trainer)
    if backend.get_vocab_size() > TINY_VOCAB:
        raise AssertionError(f"tiny tokenizer vocab {backend.get_vocab_size()} exceeds model vocab {TINY_VOCAB}")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
    )


def save_tiny_checkpoint(
    outdir: Path, arch: str = "llama", seed: int = 0, tokenizer: Any = None, **overrides: Any
) -> Path:
    """Save a tiny model and a tokenizer (default: ``make_tiny_tokenizer()``) as a HF checkpoint; return it.

    A tokenizer with more tokens than the model's vocab is refused; pass ``vocab_size=`` to widen
    the model (e.g. for ``tests.helpers_tokenizer.make_tiny_tokenizer``, ~320 tokens).
    """
    outdir = Path(outdir)
    model = make_tiny_model(arch, seed=seed, **overrides)
    tokenizer = make_tiny_tokenizer() if tokenizer is None else tokenizer
    if len(tokenizer) > model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, more than the model vocab {model.config.vocab_size}")
    model.save_pretrained(outdir)
    tokenizer.save_pretrained(outdir)
    return outdir


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a saved checkpoint, single file or sharded."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(folder).glob("model*.safetensors")):
        tensors.update(load_file(f))
    return tensors
