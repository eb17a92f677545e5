"""Write a Hugging Face tokenizer into GGUF metadata and prove llama.cpp tokenizes like it.

Two tokenizer families are written:

- byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM): ``tokenizer.ggml.model = "gpt2"`` with tokens,
  types and merges, and a pre-tokenizer name (``tokenizer.ggml.pre``) that selects llama.cpp's
  splitting regexes;
- SentencePiece-style BPE with byte fallback (Llama 1/2, Mistral, Gemma): ``"llama"`` with tokens,
  scores (minus the merge rank that creates each token, so llama.cpp's highest-score-first merging
  follows the BPE merge order) and types (BYTE for ``<0xNN>``).

Special token ids, add_bos/add_eos and the chat template come from gguf-py's ``SpecialVocab``.

The pre-tokenizer name is not stored in Hugging Face files.  Rather than fingerprint tokenizers
by hand, ``detect_pre`` asks llama.cpp itself: it writes the vocabulary with each candidate name
into a small vocab-only GGUF, tokenizes ``PROBE_TEXTS`` in llama.cpp and in the HF tokenizer, and
keeps the first candidate that agrees on every string.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from dsnot_deploy.errors import UnsupportedModelError, UserInputError

logger = logging.getLogger(__name__)

# Strings chosen to exercise every pre-tokenizer difference we know of: digit grouping, contractions,
# case, runs of spaces/newlines/tabs, punctuation runs, accents, CJK, emoji, code.
PROBE_TEXTS: tuple[str, ...] = (
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "I'm sure you've seen it; they'll say we'd won, isn't it? DON'T SHOUT, You're fine.",
    "3 33 333 3333 33333 333333 1234567890 3.14159 -42 1,000,000 2024-11-29",
    "  leading spaces\n\nnew   lines\t\ttabs \r\n windows\n   \n end  ",
    "def f(x):\n    return x**2 + 1  # comment\n\nprint(f(3))\n",
    "Ünïcödé naïve café résumé — “quotes” ‘single’ … ¿qué? ¡sí!",
    "日本語のテキスト 中文文本 한국어 텍스트 Русский текст العربية",
    "emoji 🚀🔥👍🏽 and symbols ©®™ ∑∫√ ≤≥ ← →",
    "!!!??? ... --- *** ___ ((([[[{{{ }}}]]]))) ''' \"\"\" ``` ~~~",
    "MixedCASE camelCase snake_case kebab-case UPPER lower 12abc abc12 a1b2c3",
)

# Candidates tried in order after the first guess; all are names llama.cpp 0.3.36 knows.
PRE_CANDIDATES: tuple[str, ...] = (
    "gpt-2", "llama-bpe", "qwen2", "smollm", "starcoder", "deepseek-llm", "deepseek-coder", "falcon", "mpt",
    "stablelm2", "olmo", "dbrx", "command-r", "refact", "tekken", "gpt-4o", "bloom", "default",
)


@dataclass(frozen=True)
class VocabData:
    """Everything the tokenizer section of a GGUF needs except the pre-tokenizer name."""

    model: str  # "gpt2" or "llama"
    tokens: list[bytes]
    scores: list[float] | None
    types: list[int]
    add_space_prefix: bool | None
    special: gguf.SpecialVocab
    pre_tokenizer: Any = None  # tokenizer.json's pre_tokenizer section, for the first guess of `detect_pre`


def _tokenizer_json(root: Path) -> dict[str, Any]:
    path = root / "tokenizer.json"
    if not path.is_file():
        raise UnsupportedModelError(
            f"{root} has no tokenizer.json; only fast (tokenizer.json) tokenizers can be exported"
        )
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise UserInputError(f"{path} is not valid JSON: {exc}") from None


def load_hf_tokenizer(root: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(root, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any loader failure is a bad checkpoint
        raise UserInputError(f"cannot load the tokenizer in {root}: {type(exc).__name__}: {exc}") from None


def _merge_rank_scores(tj: dict[str, Any]) -> dict[str, float]:
    scores: dict[str, float] = {}
    for rank, merge in enumerate(tj["model"].get("merges", [])):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        scores.setdefault(left + right, -float(rank))
    return scores


def _has_space_prefix(tj: dict[str, Any]) -> bool:
    def walk(node: Any) -> bool:
        if isinstance(node, dict):
            if node.get("type") == "Prepend" and node.get("prepend") == "\u2581":
                return True
            if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") in ("always", "first"):
                return bool(node.get("add_prefix_space", True))
            return any(walk(v) for v in node.values())
        if isinstance(node, list):
            return any(walk(v) for v in node)
        return False

    return walk(tj.get("normalizer")) or walk(tj.get("pre_tokenizer"))


def build_vocab(root: Path, n_vocab: int, tokenizer: Any) -> VocabData:
    """Read tokens, types (and scores) from tokenizer.json; pad to the model's vocab with UNUSED."""
    tj = _tokenizer_json(root)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise UnsupportedModelError(f"tokenizer model {model.get('type')!r} in {root} is not supported (BPE only)")
    spm_like = bool(model.get("byte_fallback"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_vocab:
        raise UserInputError(f"tokenizer has token id {max(vocab.values())} but the model's vocab_size is {n_vocab}")
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): tok for i, tok in tokenizer.added_tokens_decoder.items()}
    unk_id = tokenizer.unk_token_id
    scores_by_text = _merge_rank_scores(tj) if spm_like else {}
    tokens: list[bytes] = []
    types: list[int] = []
    scores: list[float] = []
    for i in range(n_vocab):
        text = by_id.get(i)
        if text is None:
            tokens.append(f"[PAD{i}]".encode())
            types.append(gguf.TokenType.UNUSED)
            scores.append(-1e4)
            continue
        tokens.append(text.encode("utf-8"))
        if i in added:
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        elif spm_like and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text):
            types.append(gguf.TokenType.BYTE)
        elif spm_like and i == unk_id:
            types.append(gguf.TokenType.UNKNOWN)
        else:
            types.append(gguf.TokenType.NORMAL)
        scores.append(scores_by_text.get(text, -1e4 if len(text) > 1 else 0.0))
    special = gguf.SpecialVocab(root, load_merges=not spm_like, n_vocab=n_vocab)
    return VocabData(
        model="llama" if spm_like else "gpt2",
        tokens=tokens,
        scores=scores if spm_like else None,
        types=types,
        add_space_prefix=_has_space_prefix(tj) if spm_like else False,
        special=special,
        pre_tokenizer=tj.get("pre_tokenizer"),
    )


def write_vocab(w: gguf.GGUFWriter, vocab: VocabData, pre: str | None) -> None:
    w.add_tokenizer_model(vocab.model)
    if pre is not None:
        w.add_tokenizer_pre(pre)
    w.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    w.add_token_types(vocab.types)
    if vocab.add_space_prefix is not None:
        w.add_add_space_prefix(vocab.add_space_prefix)
    vocab.special.add_to_gguf(w, quiet=True)


def _first_guess(pre_tokenizer: Any) -> tuple[str, ...]:
    """Likely names from the pre-tokenizer's shape; every guess is still checked in llama.cpp."""
    text = json.dumps(pre_tokenizer)
    guesses: list[str] = []
    if "Digits" in text and "individual_digits" in text:
        guesses += ["smollm", "starcoder", "refact"]
    if r"\\p{N}{1,3}" in text:
        guesses += ["llama-bpe", "gpt-4o", "dbrx", "command-r"]
    if r"\\p{N}" in text and r"\\p{N}{1,3}" not in text:
        guesses += ["qwen2", "deepseek-llm"]
    if '"ByteLevel"' in text and '"Split"' not in text and "Digits" not in text:
        guesses += ["gpt-2"]
    return tuple(guesses)


def usable_probes(tokenizer: Any, texts: Sequence[str] = PROBE_TEXTS) -> list[str]:
    """Probe texts (and their lines) the HF tokenizer covers without its unknown token.

    A byte-level vocabulary without all 256 byte symbols (tiny test tokenizers) maps uncovered
    characters to ``<unk>``, which llama.cpp handles differently; such strings test the vocabulary's
    coverage, not the pre-tokenizer, and are left out.
    """
    unk = tokenizer.unk_token_id
    pieces = list(texts) + [line for text in texts for line in text.split("\n") if line and line != text]
    return [t for t in pieces if unk is None or unk not in tokenizer.encode(t, add_special_tokens=False)]


def tokenization_mismatches(gguf_path: Path, tokenizer: Any, texts: Sequence[str] | None = None) -> list[str]:
    """The probe texts that llama.cpp (vocab only) tokenizes differently from the HF tokenizer."""
    from converters.llamacpp_loader import open_llama
    from dsnot_deploy.errors import DsnotError

    if importlib.util.find_spec("llama_cpp") is None:
        raise DsnotError("llama-cpp-python is needed to check tokenization: it is not installed")
    texts = usable_probes(tokenizer) if texts is None else texts
    if len(texts) < 3:
        raise UnsupportedModelError(
            f"the tokenizer covers only {len(texts)} of the probe texts without <unk>: cannot check llama.cpp's "
            "tokenization against it"
        )
    llm = open_llama(gguf_path, n_ctx=512, vocab_only=True)  # no weights: the vocabulary alone
    try:
        bad = []
        for text in texts:
            ours = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
            theirs = tokenizer.encode(text, add_special_tokens=False)
            if list(ours) != list(theirs):
                bad.append(text)
        return bad
    finally:
        llm.close()


def detect_pre(
    vocab: VocabData,
    tokenizer: Any,
    write_header: Callable[[gguf.GGUFWriter], None],
    arch_name: str,
) -> str | None:
    """The first pre-tokenizer name under which llama.cpp tokenizes every probe like HF does.

    ``write_header`` adds the architecture's hyperparameters (llama.cpp reads them even when it
    loads only the vocabulary).  SentencePiece-style vocabularies have no pre-tokenizer: None,
    after checking that they agree too.
    """
    candidates: list[str | None] = [None] if vocab.model == "llama" else []
    if vocab.model == "gpt2":
        for name in (*_first_guess(vocab.pre_tokenizer), *PRE_CANDIDATES):
            if name not in candidates:
                candidates.append(name)
    with tempfile.TemporaryDirectory(prefix="dsnot-vocab-") as tmp:
        for i, pre in enumerate(candidates):
            path = Path(tmp) / f"vocab{i}.gguf"
            w = gguf.GGUFWriter(path, arch_name)
            write_header(w)
            write_vocab(w, vocab, pre)
            w.write_header_to_file()
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            w.close()
            bad = tokenization_mismatches(path, tokenizer)
            logger.debug("pre-tokenizer %s: %d probes differ", pre, len(bad))
            if not bad:
                return pre
    raise UnsupportedModelError(
        f"no llama.cpp pre-tokenizer reproduces this tokenizer on the probe texts (tried "
        f"{', '.join(str(c) for c in candidates)}); pass --tokenizer-pre NAME to force one"
    )
