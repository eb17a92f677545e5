"""A validating GGUF reader: the layout of a file (header, metadata, tensor table, data offsets).

Every count, length and offset read from the header is checked against the bytes that remain in
the file before anything is allocated, so a truncated, altered or non-GGUF file raises a
`UserInputError` that says what was expected and what was found (never a MemoryError or a numpy
error).  Tensor data is not read here: `GGUFLayout` gives each tensor's absolute byte range.

Only little-endian GGUF versions 2 and 3 are accepted (what llama.cpp writes).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dsnot_deploy.errors import UserInputError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 8  # ggml uses 4; anything above 8 is certainly corrupt

# GGUF metadata value types: id -> (name, fixed size in bytes or None for string/array)
VALUE_TYPES: dict[int, tuple[str, int | None]] = {
    0: ("uint8", 1), 1: ("int8", 1), 2: ("uint16", 2), 3: ("int16", 2), 4: ("uint32", 4),
    5: ("int32", 4), 6: ("float32", 4), 7: ("bool", 1), 8: ("string", None), 9: ("array", None),
    10: ("uint64", 8), 11: ("int64", 8), 12: ("float64", 8),
}
_SCALAR_FMT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
ARRAY_PREVIEW = 8  # array values kept per metadata key (inspect shows a preview, not 49152 tokens)


def ggml_type_table() -> dict[int, tuple[str, int, int]]:
    """ggml type id -> (name, elements per block, bytes per block), from gguf-py's own tables."""
    import gguf

    return {int(t): (t.name, bs, ts) for t, (bs, ts) in gguf.GGML_QUANT_SIZES.items()}


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table. `dims` are ggml's (ne0 first: ne0 is the row length)."""

    name: str
    dims: tuple[int, ...]
    type_id: int
    type_name: str  # "Q8_0", ... or "type<id>" when gguf-py does not know the id
    rel_offset: int  # offset inside the data section, as stored
    start: int  # absolute offset in the file
    nbytes: int | None  # None when the type is unknown (its bytes cannot be sized)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.dims:
            n *= d
        return n

    @property
    def shape(self) -> tuple[int, ...]:
        """Row-major (numpy/PyTorch) order: the reverse of `dims`."""
        return tuple(reversed(self.dims))


@dataclass(frozen=True)
class MetadataField:
    key: str
    type_name: str  # "uint32", "string", "array[string]", ...
    value: Any  # scalar, string, or a list of at most ARRAY_PREVIEW items for arrays
    count: int  # number of items (1 for scalars)


@dataclass(frozen=True)
class GGUFLayout:
    """Where everything is in a GGUF file (absolute byte offsets)."""

    path: Path
    file_size: int
    version: int
    alignment: int
    header_end: int  # end of the tensor table
    data_start: int  # header_end rounded up to the alignment
    metadata: tuple[MetadataField, ...]
    tensors: tuple[TensorInfo, ...]
    fields: dict[str, Any] = field(default_factory=dict, compare=False)  # scalar/string values by key


class _Cursor:
    """Bounds-checked little-endian reads over a buffer."""

    def __init__(self, buf: Any, size: int, path: Path) -> None:
        self.buf, self.size, self.pos, self.path = buf, size, 0, path

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise UserInputError(
                f"{self.path}: not a valid GGUF file: {what} needs {n} bytes at offset {self.pos}, "
                f"but the file has {self.size} bytes (truncated or corrupt)"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        n = self.u64(f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.pos += n


def _read_value(cur: _Cursor, vtype: int, key: str) -> tuple[str, Any, int]:
    if vtype not in VALUE_TYPES:
        raise UserInputError(f"{cur.path}: not a valid GGUF file: metadata {key!r} has value type {vtype}, "
                             f"expected one of 0..12")
    name, _size = VALUE_TYPES[vtype]
    if vtype == 8:
        return name, cur.string(f"metadata {key!r}"), 1
    if vtype != 9:
        return name, cur.scalar(_SCALAR_FMT[vtype], f"metadata {key!r}"), 1
    etype = cur.u32(f"metadata {key!r} array type")
    count = cur.u64(f"metadata {key!r} array count")
    if etype not in VALUE_TYPES or etype == 9:
        raise UserInputError(f"{cur.path}: not a valid GGUF file: array {key!r} has element type {etype}")
    ename, esize = VALUE_TYPES[etype]
    if esize is not None:
        cur.need(count * esize, f"array {key!r} of {count} {ename}")
        fmt = _SCALAR_FMT[etype]
        preview = [struct.unpack_from(fmt, cur.buf, cur.pos + i * esize)[0] for i in range(min(count, ARRAY_PREVIEW))]
        cur.pos += count * esize
    else:  # strings: every one carries its own length; each needs at least 8 bytes
        cur.need(count * 8, f"array {key!r} of {count} strings")
        preview = []
        for i in range(count):
            if i < ARRAY_PREVIEW:
                preview.append(cur.string(f"array {key!r} item {i}"))
            else:
                cur.skip(cur.u64(f"array {key!r} item {i} length"), f"array {key!r} item {i}")
    return f"array[{ename}]", preview, count


def read_gguf_layout(path: Path) -> GGUFLayout:
    """Parse and validate the header, metadata and tensor table of a GGUF file.

    Raises `UserInputError` when the file is not GGUF (wrong magic), is big-endian or of an
    unsupported version, or when any length, count or tensor range exceeds the file.
    """
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"expected a GGUF file, found no file at {path}")
    size = path.stat().st_size
    if size < 24:
        raise UserInputError(f"{path}: not a GGUF file: {size} bytes, a GGUF header alone is 24")
    types = ggml_type_table()
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        cur = _Cursor(mm, size, path)
        magic = bytes(mm[:4])
        if magic != GGUF_MAGIC:
            raise UserInputError(f"{path}: not a GGUF file: expected magic b'GGUF', found {magic!r}")
        cur.pos = 4
        version = cur.u32("version")
        if version not in (2, 3):
            swapped = struct.unpack("<I", struct.pack(">I", version))[0]
            if swapped in (2, 3):
                raise UserInputError(f"{path}: big-endian GGUF is not supported (only little-endian)")
            raise UserInputError(f"{path}: unsupported GGUF version {version}, expected 2 or 3")
        n_tensors = cur.u64("tensor count")
        n_kv = cur.u64("metadata count")
        # every metadata entry takes >= 8 (key length) + 4 (type) bytes, every tensor entry >= 8+4+4+8
        cur.need(n_kv * 12 + n_tensors * 24, f"{n_kv} metadata entries and {n_tensors} tensor entries")
        metadata: list[MetadataField] = []
        fields: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key {i}")
            vtype = cur.u32(f"metadata {key!r} type")
            tname, value, count = _read_value(cur, vtype, key)
            metadata.append(MetadataField(key, tname, value, count))
            if not tname.startswith("array"):
                fields[key] = value
        alignment = fields.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise UserInputError(f"{path}: general.alignment must be a power of two, found {alignment!r}")
        raw_tensors = []
        for i in range(n_tensors):
            name = cur.string(f"tensor {i} name")
            n_dims = cur.u32(f"tensor {name!r} dimension count")
            if n_dims > MAX_DIMS:
                raise UserInputError(f"{path}: tensor {name!r} has {n_dims} dimensions, expected at most {MAX_DIMS}")
            dims = tuple(cur.u64(f"tensor {name!r} dimension {d}") for d in range(n_dims))
            type_id = cur.u32(f"tensor {name!r} type")
            rel = cur.u64(f"tensor {name!r} offset")
            raw_tensors.append((name, dims, type_id, rel))
        header_end = cur.pos
    data_start = -(-header_end // alignment) * alignment
    if data_start > size:
        if n_tensors:
            raise UserInputError(f"{path}: truncated GGUF: data section starts at {data_start}, file has {size} bytes")
        data_start = header_end  # a tensor-less file may end right after its metadata
    tensors = []
    for name, dims, type_id, rel in raw_tensors:
        n = 1
        for d in dims:
            n *= d
        if type_id in types:
            tname, bs, ts = types[type_id]
            if n % bs:
                raise UserInputError(f"{path}: tensor {name!r} of type {tname} has {n} elements, "
                                     f"not a multiple of the block size {bs}")
            nbytes: int | None = n // bs * ts
        else:
            tname, nbytes = f"type{type_id}", None
        start = data_start + rel
        if start > size or (nbytes is not None and start + nbytes > size):
            raise UserInputError(f"{path}: tensor {name!r} data [{start}, {start + (nbytes or 0)}) lies beyond the "
                                 f"end of the file ({size} bytes): truncated GGUF")
        tensors.append(TensorInfo(name, dims, type_id, tname, rel, start, nbytes))
    return GGUFLayout(path, size, version, alignment, header_end, data_start, tuple(metadata), tuple(tensors), fields)
