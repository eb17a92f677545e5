"""Text sources for calibration and evaluation, and the token streams made from them.

A *source* is a name or a local path:

- ``"pydoc"``: the offline default that every CPython ships (``pydoc_data.topics``), one
  document per help topic in sorted key order;
- ``"c4"``: ``allenai/c4`` shard 0 from the Hugging Face hub (split ``train`` or ``validation``);
- ``"wikitext2"``: ``wikitext-2-raw-v1`` from the hub, one row per line as ``datasets`` gives them;
- a local file: ``.txt`` (the whole file is one document), ``.raw`` (a WikiText file, read into
  the same rows as the hub dataset), ``.jsonl`` / ``.jsonl.gz`` / ``.json.gz`` (JSON lines, one
  document per line in the field ``text``).

Names win over paths: a local file literally called ``c4`` must be given as ``./c4``.
"""

from __future__ import annotations

import gzip
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.protocols import LLAMACPP, parse_protocol

logger = logging.getLogger(__name__)


NAMED_SOURCES: tuple[str, ...] = ("pydoc", "c4", "wikitext2")

# allenai/c4 shard 0 of each split: the shard GPTQ/SparseGPT/Wanda-style calibration draws from.
_C4_FILES: dict[str, str] = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
_WIKITEXT_SPLITS: tuple[str, ...] = ("train", "validation", "test")
_JSON_LINES_SUFFIXES: tuple[str, ...] = (".jsonl", ".jsonl.gz", ".json.gz")
_SUPPORTED_SUFFIXES: tuple[str, ...] = (".txt", ".raw", *_JSON_LINES_SUFFIXES)


@dataclass(frozen=True)
class TextSource:
    """The documents of one source, plus what the evaluation protocols need to rebuild its text.

    ``documents``: the documents (for WikiText, the HF-style rows: one per line, blank lines as "").
    ``raw_text``: the file text exactly as stored, for local ``.txt`` / ``.raw`` files; else None.
    ``is_rows``: True when ``documents`` are WikiText rows rather than whole documents.
    """

    name: str
    documents: tuple[str, ...]
    raw_text: str | None = None
    is_rows: bool = False

    def eval_text(self, protocol: str) -> str:
        """The one string to score for perplexity under ``protocol``.

        ``"paper"``: the documents joined by ``"\\n\\n"`` (for WikiText this is the HF rows joined,
        exactly the Wanda/SparseGPT text). ``"llamacpp"``: the file text exactly as stored for local
        ``.txt`` / ``.raw`` files (what ``llama-perplexity -f`` reads), otherwise the ``"\\n\\n"`` join.
        """
        parse_protocol(protocol, "a perplexity protocol")
        if protocol == LLAMACPP and self.raw_text is not None:
            return self.raw_text
        return "\n\n".join(self.documents)


# --------------------------------------------------------------------------- loading


def load_text_source(source: str, split: str | None = None) -> TextSource:
    """Load a named source or a local file (see the module docstring) into a :class:`TextSource`.

    ``split`` selects the split of the hub sources (c4: ``train`` (default) or ``validation``;
    wikitext2: ``test`` (default), ``validation`` or ``train``); it is ignored for ``pydoc`` and
    local files. Raises :class:`UserInputError` for a missing or unreadable file, an unknown
    extension, a JSON line without a ``text`` string, a source without any non-empty text, or a
    hub dataset that cannot be reached.
    """
    if not isinstance(source, str) or not source:
        raise UserInputError(f"expected a text source name {NAMED_SOURCES} or a file path, found {source!r}")
    if source == "pydoc":
        loaded = _load_pydoc()
    elif source == "c4":
        loaded = _load_c4(split)
    elif source == "wikitext2":
        loaded = _load_wikitext2(split)
    else:
        loaded = _load_local(Path(source))
    if not any(doc.strip() for doc in loaded.documents):
        raise UserInputError(
            f"expected text in source {source!r}, found {len(loaded.documents)} document(s) that are all empty"
        )
    logger.info("text source %s: %d documents", loaded.name, len(loaded.documents))
    return loaded


def _load_pydoc() -> TextSource:
    from pydoc_data.topics import (
        topics,  # stdlib; imported lazily to keep import side-effect free
    )

    return TextSource(name="pydoc", documents=tuple(topics[key] for key in sorted(topics)))


def _load_c4(split: str | None) -> TextSource:
    split = split or "train"
    if split not in _C4_FILES:
        raise UserInputError(f"expected a c4 split in {tuple(_C4_FILES)}, found {split!r}")
    data_file = _C4_FILES[split]
    try:
        import datasets

        rows = datasets.load_dataset("allenai/c4", data_files={split: data_file}, split=split)
        texts = _text_column(rows, "allenai/c4")
    except UserInputError:
        raise
    except Exception as exc:  # network, hub, cache and parsing errors all mean "not available"
        raise UserInputError(
            f"could not load allenai/c4 ({data_file}) from the Hugging Face hub: {type(exc).__name__}: {exc}. "
            "The hub could not be reached or the file is not cached; pass a local copy instead, "
            "e.g. a .jsonl or .json.gz file of C4 documents with a 'text' field"
        ) from exc
    return TextSource(name=f"c4:{split}", documents=texts)


def _load_wikitext2(split: str | None) -> TextSource:
    split = split or "test"
    if split not in _WIKITEXT_SPLITS:
        raise UserInputError(f"expected a wikitext2 split in {_WIKITEXT_SPLITS}, found {split!r}")
    try:
        import datasets

        rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
        texts = _text_column(rows, "wikitext")
    except UserInputError:
        raise
    except Exception as exc:
        raise UserInputError(
            f"could not load wikitext (wikitext-2-raw-v1, {split}) from the Hugging Face hub: "
            f"{type(exc).__name__}: {exc}. The hub could not be reached or the dataset is not cached; "
            "pass a local copy instead, e.g. wikitext-2-raw-v1/wiki.test.raw"
        ) from exc
    return TextSource(name=f"wikitext2:{split}", documents=texts, is_rows=True)


def _text_column(rows: Any, dataset: str) -> tuple[str, ...]:
    """The ``text`` field of every row of a loaded dataset (an HF Dataset or a list of dicts)."""
    column_names = getattr(rows, "column_names", None)
    if column_names is not None and "text" not in column_names:
        raise UserInputError(f"expected a 'text' column in {dataset}, found columns {column_names}")
    texts = tuple(rows["text"]) if column_names is not None else tuple(row["text"] for row in rows)
    return texts


def _load_local(path: Path) -> TextSource:
    suffix = _suffix(path)
    if suffix is None:
        raise UserInputError(
            f"expected a source name {NAMED_SOURCES} or a file ending in {_SUPPORTED_SUFFIXES}, found {str(path)!r}"
        )
    if not path.is_file():
        raise UserInputError(f"expected an existing text file, found no file at {str(path)!r}")
    raw = _read_text(path, compressed=suffix.endswith(".gz"))
    if suffix == ".txt":
        return TextSource(name=str(path), documents=(raw,), raw_text=raw)
    if suffix == ".raw":
        return TextSource(name=str(path), documents=raw_file_rows(raw), raw_text=raw, is_rows=True)
    return TextSource(name=str(path), documents=_json_lines_texts(raw, path))


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    # longest first, so ".jsonl.gz" is not taken for something else
    for suffix in sorted(_SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _read_text(path: Path, compressed: bool) -> str:
    """The file decoded as UTF-8, byte for byte (no newline translation)."""
    try:
        data = gzip.decompress(path.read_bytes()) if compressed else path.read_bytes()
        return data.decode("utf-8")
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserInputError(f"could not read {str(path)!r}: {exc}") from exc
    except UnicodeDecodeError as exc:
        raise UserInputError(f"expected UTF-8 text in {str(path)!r}, found invalid bytes: {exc}") from exc


def raw_file_rows(text: str) -> tuple[str, ...]:
    """Rows of a WikiText ``.raw`` file as ``datasets`` gives them: one per line, keeping the
    line end, with blank lines (only whitespace) as "". Line ends are read as ``open()`` would
    (``\\r\\n`` and ``\\r`` become ``\\n``)."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return tuple(line if line.strip() else "" for line in text.splitlines(keepends=True))


def _json_lines_texts(raw: str, path: Path) -> tuple[str, ...]:
    texts: list[str] = []
    for lineno, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserInputError(f"expected one JSON object per line in {str(path)!r}, line {lineno}: {exc}") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            found = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserInputError(
                f"expected a string field 'text' on every line of {str(path)!r}, line {lineno} has {found}"
            )
        texts.append(record["text"])
    return tuple(texts)


# --------------------------------------------------------------------------- tokens


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` by the tokenizer's default call (its default special tokens, e.g.
    one BOS for Llama tokenizers), without the warning about exceeding ``model_max_length``."""
    return list(tokenizer(text, verbose=False)["input_ids"])


def tokenize_eval(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole ``text`` as one 1-D LongTensor of token ids, tokenized once with the tokenizer's
    default special tokens (one BOS at the start if the tokenizer adds one)."""
    ids = _encode(tokenizer, text)
    logger.info("evaluation text: %d characters -> %d tokens", len(text), len(ids))
    return torch.tensor(ids, dtype=torch.long)


def sample_calibration(
    tokenizer: Any,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    seed: int = 0,
) -> torch.Tensor:
    """``nsamples`` random windows of ``seqlen`` tokens, as a LongTensor ``(nsamples, seqlen)``.

    Reference recipe (algorithms.md section 1), with ``rng = random.Random(seed)``: draw a document
    ``rng.randint(0, len(documents) - 1)``, tokenize it with the tokenizer's default call (so a
    Llama tokenizer's BOS is part of the ids and can start a window), redraw while it has
    ``<= seqlen`` tokens, then take ``ids[i:i + seqlen]`` with ``i = rng.randint(0, len(ids) - seqlen - 1)``.
    This is the same sequence of random draws as the Wanda/SparseGPT loaders after
    ``random.seed(seed)``. Each document is tokenized at most once.

    Fallback: when no document has more than ``seqlen`` tokens (found once every document has been
    drawn), all documents are joined with ``"\\n\\n"`` into one token stream and the windows are drawn
    from it with the same rng. Raises :class:`UserInputError` if even that stream has fewer than
    ``seqlen + 1`` tokens. Deterministic for a given seed, tokenizer and documents.
    """
    if nsamples < 1 or seqlen < 1:
        raise UserInputError(f"expected nsamples >= 1 and seqlen >= 1, found nsamples={nsamples}, seqlen={seqlen}")
    if len(documents) == 0:
        raise UserInputError("expected at least one calibration document, found none")
    rng = random.Random(seed)
    cache: dict[int, list[int]] = {}
    any_long = False
    windows: list[list[int]] = []
    while len(windows) < nsamples:
        if not any_long and len(cache) == len(documents):
            return _sample_joined(tokenizer, documents, nsamples, seqlen, rng, longest=max(map(len, cache.values())))
        index = rng.randint(0, len(documents) - 1)
        ids = cache.get(index)
        if ids is None:
            ids = cache[index] = _encode(tokenizer, documents[index])
        if len(ids) <= seqlen:
            continue
        any_long = True
        start = rng.randint(0, len(ids) - seqlen - 1)
        windows.append(ids[start : start + seqlen])
    logger.info(
        "calibration: %d windows of %d tokens drawn from whole documents (%d of %d documents tokenized)",
        nsamples,
        seqlen,
        len(cache),
        len(documents),
    )
    return torch.tensor(windows, dtype=torch.long)


def _sample_joined(
    tokenizer: Any,
    documents: Sequence[str],
    nsamples: int,
    seqlen: int,
    rng: random.Random,
    longest: int,
) -> torch.Tensor:
    stream = _encode(tokenizer, "\n\n".join(documents))
    if len(stream) <= seqlen:
        raise UserInputError(
            f"expected at least {seqlen + 1} tokens of calibration text for windows of seqlen={seqlen}, "
            f"found {len(stream)} tokens in all {len(documents)} documents joined"
        )
    windows = []
    for _ in range(nsamples):
        start = rng.randint(0, len(stream) - seqlen - 1)
        windows.append(stream[start : start + seqlen])
    logger.info(
        "calibration: no document is longer than seqlen=%d tokens (longest %d); drew %d windows from "
        "all %d documents joined with blank lines (%d tokens)",
        seqlen,
        longest,
        nsamples,
        len(documents),
        len(stream),
    )
    return torch.tensor(windows, dtype=torch.long)
