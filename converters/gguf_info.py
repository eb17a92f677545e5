"""What a GGUF file says about itself, read without loading weights: metadata, vocabulary (and its
fingerprint), tensor types, file type. The header's counts and lengths are validated against the
file size first (``gguf_read.read_gguf_layout``), then gguf-py reads the values."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from converters.gguf_read import GGUF_MAGIC
from dsnot_deploy.errors import UserInputError

# Keys whose arrays are the vocabulary itself: kept out of GGUFInfo.metadata (tens of thousands
# of entries) and compared through GGUFInfo.tokens / vocab_fingerprint instead.
_VOCAB_ARRAY_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores",
                     "tokenizer.ggml.merges")


@dataclass(frozen=True)
class GGUFInfo:
    """What a GGUF file says about itself (read without loading weights).

    ``metadata``: every key/value except the vocabulary arrays, scalars as Python numbers/strings,
    arrays as lists. ``tokens``: ``tokenizer.ggml.tokens``. ``vocab_fingerprint``: sha256 over the
    tokenizer model, pre-tokenizer, tokens, token types and merges (two files tokenize identically
    when it matches). ``tensor_types``: how many tensors have each ggml type name.
    ``file_type``: ``general.file_type`` (a ``gguf.LlamaFileType`` value) or None when absent.
    """

    path: Path
    architecture: str
    file_type: int | None
    tensor_types: dict[str, int]
    metadata: dict[str, Any]
    tokens: tuple[str, ...]
    vocab_fingerprint: str
    size_bytes: int

    @property
    def file_type_name(self) -> str:
        """``general.file_type`` as the quantization name used by the exporter (``F16``, ``Q8_0``...).

        Without ``general.file_type`` the most common type of the 2-D weight tensors is used.
        """
        import gguf

        if self.file_type is not None:
            try:
                name = gguf.LlamaFileType(self.file_type).name
            except ValueError:
                return f"file_type_{self.file_type}"
            return name.removeprefix("MOSTLY_").removeprefix("ALL_")
        matrices = {k: v for k, v in self.tensor_types.items() if k not in ("F32",)}
        pool = matrices or self.tensor_types
        return max(sorted(pool), key=lambda k: pool[k]) if pool else "unknown"

    @property
    def block_count(self) -> int | None:
        value = self.metadata.get(f"{self.architecture}.block_count")
        return int(value) if value is not None else None

    @property
    def per_layer_sparsity(self) -> list[float] | None:
        """``dsnot.sparsity.per_layer`` (one value per decoder layer) when the exporter wrote it."""
        value = self.metadata.get("dsnot.sparsity.per_layer")
        if value is None:
            return None
        return [float(v) for v in (value if isinstance(value, list) else [value])]

    def dsnot_metadata(self) -> dict[str, Any]:
        """Every ``dsnot.*`` key (what was pruned, how, and how sparse it is)."""
        return {k: v for k, v in self.metadata.items() if k.startswith("dsnot.")}


def check_gguf_file(path: str | os.PathLike[str], what: str = "GGUF file") -> Path:
    """``path`` as a Path if it is a readable file starting with the GGUF magic; else UserInputError."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"expected the {what} {str(path)!r}, found no such file")
    try:
        with path.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise UserInputError(f"could not read the {what} {str(path)!r}: {exc.strerror}") from None
    if magic != GGUF_MAGIC:
        raise UserInputError(
            f"expected a GGUF file (starting with the bytes b'GGUF') for the {what}, found {magic!r} at the start "
            f"of {str(path)!r}"
        )
    return path


def read_gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read the header of a GGUF file (see :class:`GGUFInfo`); UserInputError if it is not one."""
    import hashlib

    import gguf

    from converters.gguf_read import read_gguf_layout

    path = check_gguf_file(path)
    # gguf-py trusts the header's counts (reads past the end give empty arrays, so a corrupt count
    # loops and allocates without bound): validate every count and length against the file size first
    read_gguf_layout(path)
    try:
        reader = gguf.GGUFReader(str(path), "r")
    except Exception as exc:  # a corrupt header is the user's input
        raise UserInputError(f"could not parse the GGUF file {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    metadata: dict[str, Any] = {}
    vocab: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = _field_value(fld)
        if name in _VOCAB_ARRAY_KEYS:
            vocab[name] = value
        else:
            metadata[name] = value
    tensor_types = tensor_type_counts(reader)
    tokens = tuple(vocab.get("tokenizer.ggml.tokens") or ())
    digest = hashlib.sha256()
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre"):
        digest.update(repr(metadata.get(key)).encode())
    for key in _VOCAB_ARRAY_KEYS:
        if key != "tokenizer.ggml.scores":
            digest.update(repr(vocab.get(key)).encode())
    file_type = metadata.get("general.file_type")
    del reader
    return GGUFInfo(
        path=path,
        architecture=str(metadata.get("general.architecture", "")),
        file_type=int(file_type) if file_type is not None else None,
        tensor_types=tensor_types,
        metadata=metadata,
        tokens=tokens,
        vocab_fingerprint=digest.hexdigest(),
        size_bytes=path.stat().st_size,
    )


def tensor_type_counts(reader: Any) -> dict[str, int]:
    """How many tensors of an open ``gguf.GGUFReader`` have each ggml type name, by name."""
    import gguf

    counts: dict[str, int] = {}
    for tensor in reader.tensors:
        name = gguf.GGMLQuantizationType(tensor.tensor_type).name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def tensor_types_by_name(reader: Any) -> dict[str, str]:
    """Each tensor's ggml type name in an open ``gguf.GGUFReader``, by tensor name (``{"blk.0.attn_q.weight":
    "Q4_0", ...}``): what a file really holds, to compare with what an exporter planned."""
    import gguf

    return {tensor.name: gguf.GGMLQuantizationType(tensor.tensor_type).name for tensor in reader.tensors}


def _field_value(fld: Any) -> Any:
    """A GGUF field as Python: str, int/float/bool, or a list of those."""
    import gguf

    types = list(fld.types)
    if not types:
        return None
    if types[0] == gguf.GGUFValueType.ARRAY:
        inner = types[1] if len(types) > 1 else None
        if inner == gguf.GGUFValueType.STRING:
            return [bytes(fld.parts[i]).decode("utf-8", errors="replace") for i in fld.data]
        return [fld.parts[i].tolist()[0] if len(fld.parts[i]) == 1 else fld.parts[i].tolist() for i in fld.data]
    if types[0] == gguf.GGUFValueType.STRING:
        return bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
    value = fld.parts[fld.data[0]].tolist()
    value = value[0] if len(value) == 1 else value
    if types[0] == gguf.GGUFValueType.BOOL:
        return bool(value)
    return value


def check_same_vocabulary(a: GGUFInfo, b: GGUFInfo) -> None:
    """UserInputError unless both files have the same tokenizer (model, pre-tokenizer, tokens, merges)."""
    if a.vocab_fingerprint == b.vocab_fingerprint:
        return
    detail = f"{len(a.tokens)} vs {len(b.tokens)} tokens"
    if len(a.tokens) == len(b.tokens):
        diff = [i for i, (x, y) in enumerate(zip(a.tokens, b.tokens)) if x != y]
        detail = f"{len(diff)} of {len(a.tokens)} tokens differ (first at id {diff[0]})" if diff else \
            "same tokens but different tokenizer model, pre-tokenizer, token types or merges"
    raise UserInputError(
        f"expected {a.path.name} and {b.path.name} to share one vocabulary (both sides must see identical "
        f"tokens), found {detail}"
    )
