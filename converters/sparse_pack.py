"""The sparse pack (format version 1, spec in docs/pack-format.md): GGUF -> pack -> identical GGUF.

`pack_gguf` cuts the GGUF into segments that cover every byte once, in file order: the header
(magic, metadata, tensor table, alignment padding), one segment per tensor (with the padding
that follows it), and raw segments for anything else (bytes no tensor claims). Each segment
becomes one record: a small JSON descriptor and zstd streams. Tensors of a zero-keeping type are
split into scales (`side`), positions (`mask`) and the codes of the kept weights (`values`);
the mask is a bitmask, gap-coded positions, or N:M pattern codes, whichever is smallest, and a
tensor falls back to `raw` (zstd of its bytes) when that is smaller or when its sparse encoding
does not decode to exactly its bytes (checked for every tensor while packing).

`unpack` writes the records' bytes in order to a temporary file, checks every record's length
and CRC-32, the record count, the total size and the original sha256, then renames it into place.
A truncated or altered pack raises `UserInputError` and writes nothing.

One tensor is held at a time: peak memory is a small multiple of the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from dsnot_deploy.atomic import atomic_file, check_output_file
from dsnot_deploy.errors import UserInputError

from .gguf_read import GGUFLayout, TensorInfo, read_gguf_layout
from .pack_blocks import LAYOUTS, BlockLayout
from .pack_codecs import (
    CorruptPack,
    binary_entropy_bits,
    bitmask_decode,
    bitmask_encode,
    compress,
    decompress,
    entropy_bits,
    from_planes,
    gaps_decode_mask,
    gaps_encode_mask,
    nm_codes,
    nm_decode,
    nm_encode,
    nm_min_zeros,
    nm_supported,
    to_planes,
)

log = logging.getLogger(__name__)

MAGIC = b"DSNPACK\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32sQ")  # magic, version, flags, original size, original sha256, records
HEADER_SIZE = _HEADER.size + 4  # + CRC-32 of the fields above
_REC = struct.Struct("<II")  # descriptor length, CRC-32 of the descriptor
MAX_DESCRIPTOR = 1 << 20
RAW_CHUNK = 64 << 20  # raw segments are cut into records of at most this many bytes
MAX_TAIL = 4096  # padding after a tensor up to this size rides in the tensor's record
FLOAT_TYPES = {"F32": 4, "F16": 2, "BF16": 2}
NM_GROUPS = (4, 8)
SCATTER_CHUNK = 1 << 20  # weights per step of the vectorised scatter/histograms (bounds temporaries)
PROBE_LEVEL = 3  # zstd level at which the candidates of a tensor are compared
DECODE_WORKERS = 2  # records decoded in parallel by unpack (the main thread hashes and writes)
GAPS_MAX_MINORITY = 0.25  # gap coding is tried when zeros or non-zeros are at most this fraction


@dataclass(frozen=True)
class PackLevels:
    """zstd level per stream kind. Sizes measured on SmolLM2-135M tensors (docs/pack-format.md);
    decompression speed does not depend on the level. `FAST_LEVELS` packs about 40x faster."""

    meta: int = 19  # header/metadata: small and very compressible
    raw: int = 19  # tensors stored whole (types that lose zeros): 3% smaller than level 3 on Q4_1
    side: int = 19  # block scales: 0.676 of raw at 19 vs 0.708 at 9 (Q8_0 scales)
    mask: int = 3  # bitmask / gaps / N:M codes: near-random; level 19 gives the same size at 70x the CPU
    values: int = 19  # codes of kept weights: 0.875 of raw at 19 vs 0.928 at 3..9 (Q8_0, 50%)

    def __post_init__(self) -> None:
        for name in ("meta", "raw", "side", "mask", "values"):
            v = getattr(self, name)
            if not isinstance(v, int) or not 1 <= v <= 22:
                raise UserInputError(f"zstd level for {name} must be in 1..22, found {v!r}")


FAST_LEVELS = {"meta": 19, "raw": 3, "side": 3, "mask": 3, "values": 3}


@dataclass
class Record:
    """One encoded segment: descriptor + stream payloads, and what it cost."""

    desc: dict[str, Any]
    payloads: list[bytes]

    def to_bytes(self) -> bytes:
        d = json.dumps(self.desc, separators=(",", ":"), sort_keys=True).encode()
        return _REC.pack(len(d), zlib.crc32(d)) + d + b"".join(self.payloads)


@dataclass
class PackSummary:
    """What `pack_gguf` wrote; `records` are the descriptors (with per-stream stored sizes)."""

    original_size: int
    pack_size: int
    sha256: str
    records: list[dict[str, Any]] = field(default_factory=list)

    def breakdown(self) -> dict[str, int]:
        return size_breakdown(self.records, self.pack_size)


# ---- encoding -----------------------------------------------------------------------------------

def _stream(name: str, raw: bytes | np.ndarray, level: int) -> tuple[list[Any], bytes]:
    raw_len = raw.nbytes if isinstance(raw, np.ndarray) else len(raw)
    blob = compress(raw, level)
    return [name, raw_len, len(blob)], blob


def _raw_record(kind: str, offset: int, data: bytes, level: int, extra: dict[str, Any] | None = None,
                planes: int = 1) -> Record:
    arr = np.frombuffer(data, np.uint8)
    body = arr if planes == 1 else to_planes(arr.view(f"<u{planes}"))
    entry, blob = _stream("raw", body, level)
    desc = {"k": kind, "off": offset, "len": len(data), "crc": zlib.crc32(data), "s": [entry]}
    if planes != 1:
        desc["planes"] = planes
    if extra:
        desc.update(extra)
    return Record(desc, [blob])


def _sparse_record(base: dict[str, Any], lay: BlockLayout, side: np.ndarray, flat: np.ndarray, kept: np.ndarray,
                   mask_kind: str, mask_stream: np.ndarray, mask_fields: dict[str, Any],
                   levels: PackLevels) -> Record:
    streams, blobs = [], []
    parts = ([("side", to_planes_2d(side), levels.side)] if lay.side_bytes else []) + [
        ("mask", mask_stream, levels.mask), ("values", to_planes(flat[kept]), levels.values)]
    for name, data, level in parts:
        entry, blob = _stream(name, data, level)
        streams.append(entry)
        blobs.append(blob)
    desc = {**base, "enc": "sparse", "mask": mask_kind, "kept": int(np.count_nonzero(kept)), "s": streams,
            **mask_fields}
    return Record(desc, blobs)


def _values_entropy(lay: BlockLayout, values: np.ndarray) -> float:
    if values.size == 0:
        return 0.0
    if lay.code_bits <= 16:
        counts = sum(np.bincount(values[a:a + SCATTER_CHUNK], minlength=1 << lay.code_bits)
                     for a in range(0, values.size, SCATTER_CHUNK))
        counts = counts[counts > 0]
        return float(-(counts * np.log2(counts / values.size)).sum())
    return entropy_bits(values)


def mask_bound_bits(zero: np.ndarray, row_len: int) -> float:
    """0th-order entropy bound, in bits, of where a tensor's zeros are: the smallest of n * H(zero
    fraction) and, for M in (4, 8) dividing the row length, the empirical entropy of the M-bit
    symbols that say which weights of each group of M consecutive weights are zero.  The group
    symbols see an N:M structure (a 2:4 mask costs at most log2(6) bits per group) together with
    any extra zeros quantization added, which the pattern codes alone do not describe."""
    n = zero.size
    bound = binary_entropy_bits(int(zero.sum()), n)
    for m in NM_GROUPS:
        if n and row_len % m == 0 and n % m == 0:
            bound = min(bound, _symbol_entropy(group_symbols(zero, m)))
    return bound


def group_symbols(zero: np.ndarray, m: int) -> np.ndarray:
    """The zero flags of every group of m (<= 8) consecutive weights as one integer (bit j = weight j)."""
    out = np.zeros(zero.size // m, np.int64)
    for a in range(0, out.size, SCATTER_CHUNK):
        g = zero[a * m:(a + SCATTER_CHUNK) * m].reshape(-1, m)
        out[a:a + g.shape[0]] = np.packbits(g, axis=1, bitorder="little")[:, 0]
    return out


def _stored(rec: Record) -> int:
    return sum(s[2] for s in rec.desc["s"])


def encode_tensor(info: TensorInfo, data: bytes, levels: PackLevels) -> Record:
    """Encode one tensor's bytes: the smallest of raw and the sparse candidates that round-trips.

    Candidates are compared at the fast probe levels (`PROBE_LEVEL`, zstd 3: sizes within a few
    percent of the final ones, and the same ranking), then only the winner is compressed at the
    configured levels and checked by decoding it.
    """
    base = {"k": "tensor", "off": info.start, "len": len(data), "crc": zlib.crc32(data), "name": info.name,
            "type": info.type_name, "dims": list(info.dims)}
    lay = LAYOUTS.get(info.type_name)
    planes = FLOAT_TYPES.get(info.type_name, 1)
    probe = PackLevels(**{k: min(v, PROBE_LEVEL) for k, v in asdict(levels).items()})

    def raw_record(lv: PackLevels) -> Record:
        return _raw_record("tensor", info.start, data, lv.raw, {**base, "enc": "raw"}, planes)

    if lay is None or len(data) == 0 or not info.dims or info.dims[0] % lay.block_elems:
        return raw_record(levels)
    blocks = np.frombuffer(data, np.uint8).reshape(-1, lay.block_bytes)
    side, codes = lay.split(blocks)
    flat = codes.reshape(-1)
    zero = flat == lay.zero_code
    n = flat.size
    n_zero = int(zero.sum())
    kept = ~zero

    # (builder(levels) -> Record, mask entropy bound in bits, kept mask)
    candidates: list[tuple[Callable[[PackLevels], Record], float, np.ndarray]] = []
    bm_stream = bitmask_encode(kept)
    mask_choice: tuple[str, np.ndarray, dict[str, Any]] = ("bitmask", bm_stream, {})
    if min(n_zero, n - n_zero) <= GAPS_MAX_MINORITY * n:  # denser minorities: the bitmask is near the bound
        g_stream, minority_kept, count = gaps_encode_mask(kept)
        if len(compress(g_stream, levels.mask)) < len(compress(bm_stream, levels.mask)):
            mask_choice = ("gaps", g_stream, {"mk": minority_kept, "mc": count})
    candidates.append((lambda lv, mc=mask_choice: _sparse_record(base, lay, side, flat, kept, mc[0], mc[1], mc[2], lv),
                       mask_bound_bits(zero, info.dims[0]), kept))
    for m in NM_GROUPS:
        nmin = nm_min_zeros(zero, info.dims[0], m)
        if nmin >= 1 and nm_supported(nmin, m) and n % m == 0:
            stream, kept_nm = nm_encode(zero, nmin, m)
            candidates.append((
                lambda lv, st=stream, k=kept_nm, nm=[nmin, m]: _sparse_record(base, lay, side, flat, k, "nm", st,
                                                                              {"nm": nm}, lv),
                _symbol_entropy(nm_codes(zero, nmin, m)), kept_nm))
    raw_probe = raw_record(probe)
    probed = sorted(((_stored(build(probe)), i) for i, (build, _, _) in enumerate(candidates)))
    for size, i in probed:
        if size >= _stored(raw_probe):
            break
        build, bound, kept_c = candidates[i]
        rec = build(levels)
        try:
            ok = same_bytes(decode_record_bytes(rec.desc, rec.payloads), data)
        except UserInputError:
            ok = False
        if not ok:  # cannot happen by construction; never ship what does not round-trip
            log.warning("tensor %s: sparse encoding does not round-trip; stored raw", info.name)
            continue
        rec.desc["eb"] = [round(bound, 1), round(_values_entropy(lay, flat[kept_c]), 1)]
        rec.desc["zeros"] = n_zero
        return rec
    rec = raw_probe if asdict(probe) == asdict(levels) else raw_record(levels)
    rec.desc["zeros"] = n_zero
    return rec


def _symbol_entropy(codes: np.ndarray) -> float:
    """0th-order entropy in bits of small non-negative integer symbols."""
    counts = np.bincount(codes.astype(np.int64))
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / codes.size)).sum()) if codes.size else 0.0


def to_planes_2d(side: np.ndarray) -> np.ndarray:
    """(n_blocks, s) side bytes -> column-major bytes (each side byte position is one plane)."""
    return np.ascontiguousarray(side.T).reshape(-1)


# ---- decoding -----------------------------------------------------------------------------------

def _as_int(desc: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = desc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptPack(f"record field {key!r} is {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def decode_record_bytes(desc: dict[str, Any], payloads: list[bytes]) -> bytes | np.ndarray:
    """Restore a record's bytes (segment + tail) from its descriptor and stream payloads."""
    length = _as_int(desc, "len")
    streams = desc["s"]
    raw = [decompress(p, s[1]) for p, s in zip(payloads, streams)]
    names = [s[0] for s in streams]
    if desc.get("enc", "raw") == "raw":
        if names != ["raw"]:
            raise CorruptPack(f"raw record with streams {names}")
        planes = desc.get("planes", 1)
        if planes not in (1, 2, 4):
            raise CorruptPack(f"raw record with {planes!r} planes")
        body = raw[0] if planes == 1 else from_planes(np.frombuffer(raw[0], np.uint8), np.dtype(f"<u{planes}")).tobytes()
        if len(body) != length:
            raise CorruptPack(f"raw record restores {len(body)} bytes, its record says {length}")
        return body
    lay = LAYOUTS.get(desc.get("type"))
    if lay is None or desc.get("enc") != "sparse":
        raise CorruptPack(f"sparse record of unknown type {desc.get('type')!r}")
    dims = desc.get("dims")
    if not isinstance(dims, list) or not dims or not all(isinstance(d, int) and d >= 0 for d in dims):
        raise CorruptPack(f"record dims {dims!r}")
    n = int(np.prod(dims, dtype=object))
    if n % lay.block_elems or n // lay.block_elems * lay.block_bytes != length:
        raise CorruptPack(f"dims {dims} of {desc.get('type')} do not make {length} bytes")
    n_blocks = n // lay.block_elems
    by_name = dict(zip(names, raw))
    expected = (["side"] if lay.side_bytes else []) + ["mask", "values"]
    if names != expected:
        raise CorruptPack(f"sparse record with streams {names}, expected {expected}")
    mask_stream = np.frombuffer(by_name["mask"], np.uint8)
    kind = desc.get("mask")
    if kind == "bitmask":
        kept = bitmask_decode(mask_stream, n)
    elif kind == "gaps":
        kept = gaps_decode_mask(mask_stream, bool(desc.get("mk")), _as_int(desc, "mc", 0, n), n)
    elif kind == "nm":
        nm = desc.get("nm")
        if not (isinstance(nm, list) and len(nm) == 2 and all(isinstance(x, int) for x in nm) and nm_supported(*nm)):
            raise CorruptPack(f"record N:M {nm!r}")
        if n % nm[1]:
            raise CorruptPack(f"{n} weights do not split into groups of {nm[1]}")
        kept = nm_decode(mask_stream, nm[0], nm[1], n // nm[1])
    else:
        raise CorruptPack(f"unknown mask kind {kind!r}")
    n_kept = _as_int(desc, "kept", 0, n)
    values = from_planes(np.frombuffer(by_name["values"], np.uint8), lay.code_dtype)
    if values.size != n_kept:
        raise CorruptPack(f"{values.size} values for {n_kept} kept weights")
    if int(np.count_nonzero(kept)) != n_kept:
        raise CorruptPack(f"the mask keeps {int(np.count_nonzero(kept))} weights, the record says {n_kept}")
    if lay.side_bytes:
        side_raw = np.frombuffer(by_name["side"], np.uint8)
        if side_raw.size != n_blocks * lay.side_bytes:
            raise CorruptPack(f"side stream of {side_raw.size} bytes for {n_blocks} blocks")
        side = side_raw.reshape(lay.side_bytes, n_blocks).T
    else:
        side = np.empty((n_blocks, 0), np.uint8)
    codes = np.full(n, lay.zero_code, lay.code_dtype)
    vi = 0
    for a in range(0, n, SCATTER_CHUNK):  # chunks bound the int64 positions to 8 * SCATTER_CHUNK bytes
        pos = np.flatnonzero(kept[a:a + SCATTER_CHUNK])  # + a fancy-index scatter: 3-5x faster than a
        codes[a:a + SCATTER_CHUNK][pos] = values[vi:vi + pos.size]  # boolean-mask assignment
        vi += pos.size
    del kept, values, mask_stream, raw  # free the streams before the output block array exists
    by_name.pop("mask")
    by_name.pop("values")
    return np.ascontiguousarray(lay.join(side, codes.reshape(n_blocks, lay.block_elems))).reshape(-1)


def same_bytes(a: bytes | np.ndarray, b: bytes) -> bool:
    """Byte equality of a bytes object or a contiguous uint8 array with `b`, without copying."""
    return memoryview(a).cast("B") == memoryview(b)


def decode_record(desc: dict[str, Any], payloads: list[bytes]) -> list[bytes | np.ndarray]:
    """Buffers to write for a record: the segment's bytes (checked against the record's length and
    CRC-32), then its tail of zero bytes if any."""
    try:
        body = decode_record_bytes(desc, payloads)
        tail_len = _as_int(desc, "tz", 0, MAX_TAIL) if "tz" in desc else 0
    except CorruptPack:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise CorruptPack(f"record {desc.get('name', desc.get('k'))!r} does not decode ({exc})") from None
    if len(memoryview(body).cast("B")) != desc.get("len") or zlib.crc32(body) != desc.get("crc"):
        raise CorruptPack(f"record {desc.get('name', desc.get('k'))!r}: CRC-32 of the restored bytes does not match")
    return [body, bytes(tail_len)] if tail_len else [body]


# ---- the file -----------------------------------------------------------------------------------

def _segments(layout: GGUFLayout) -> list[tuple[str, int, int, TensorInfo | None]]:
    """(kind, start, end, tensor) covering [0, file_size) exactly once, in order."""
    segs: list[tuple[str, int, int, TensorInfo | None]] = []
    size = layout.file_size
    head_end = min(layout.data_start, size)
    segs.append(("raw", 0, head_end, None))
    cur = head_end
    for t in sorted((t for t in layout.tensors if t.nbytes is not None), key=lambda t: (t.start, t.nbytes)):
        if t.start < cur or t.nbytes == 0:
            continue  # overlapping or empty: its bytes (if any) are covered by other segments
        if t.start > cur:
            segs.append(("raw", cur, t.start, None))
        segs.append(("tensor", t.start, t.start + t.nbytes, t))
        cur = t.start + t.nbytes
    if cur < size:
        segs.append(("raw", cur, size, None))
    return segs


def pack_gguf(src: Path, dst: Path, *, force: bool = False, levels: PackLevels | None = None,
              progress: bool = False) -> PackSummary:
    """Pack the GGUF `src` into `dst` (atomic). Returns the summary of what was written."""
    from tqdm import tqdm

    levels = levels or PackLevels()
    layout = read_gguf_layout(src)
    check_output_file(dst, force)
    segs = _segments(layout)
    sha = hashlib.sha256()
    records: list[dict[str, Any]] = []
    with open(src, "rb") as fin, atomic_file(dst, force) as out, \
            tqdm(total=layout.file_size, unit="B", unit_scale=True, desc="pack", disable=not progress) as bar:
        out.write(bytes(HEADER_SIZE))
        i = 0
        while i < len(segs):
            kind, start, end, info = segs[i]
            fin.seek(start)
            if kind == "tensor":
                data = _read_exact(fin, end - start, src)
                sha.update(data)
                rec = encode_tensor(info, data, levels)
                bar.update(len(data))
                if i + 1 < len(segs) and segs[i + 1][0] == "raw" and segs[i + 1][2] - segs[i + 1][1] <= MAX_TAIL:
                    tail = _read_exact(fin, segs[i + 1][2] - segs[i + 1][1], src)
                    if not tail.strip(b"\x00"):
                        sha.update(tail)
                        rec.desc["tz"] = len(tail)
                        bar.update(len(tail))
                        i += 1
                _write_record(out, rec, records)
            else:
                level = levels.meta if start == 0 else levels.raw
                for off in range(start, end, RAW_CHUNK):
                    data = _read_exact(fin, min(RAW_CHUNK, end - off), src)
                    sha.update(data)
                    _write_record(out, _raw_record("raw", off, data, level), records)
                    bar.update(len(data))
            i += 1
        end_rec = Record({"k": "end", "n": len(records), "size": layout.file_size}, [])
        out.write(end_rec.to_bytes())
        digest = sha.digest()
        out.seek(0)
        out.write(_header_bytes(layout.file_size, digest, len(records)))
        out.seek(0, 2)
        pack_size = out.tell()
    return PackSummary(layout.file_size, pack_size, digest.hex(), records)


def _read_exact(fh: BinaryIO, n: int, path: Path) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise UserInputError(f"{path}: file changed or ended while reading ({len(data)} of {n} bytes)")
    return data


def _write_record(out: BinaryIO, rec: Record, records: list[dict[str, Any]]) -> None:
    out.write(rec.to_bytes())
    records.append(rec.desc)


def _header_bytes(size: int, digest: bytes, n_records: int) -> bytes:
    h = _HEADER.pack(MAGIC, FORMAT_VERSION, 0, size, digest, n_records)
    return h + struct.pack("<I", zlib.crc32(h))


@dataclass(frozen=True)
class PackHeader:
    version: int
    original_size: int
    sha256: str
    n_records: int


def read_header(fh: BinaryIO, path: Path, pack_size: int) -> PackHeader:
    head = fh.read(HEADER_SIZE)
    if len(head) < 8 or head[:8] != MAGIC:
        raise UserInputError(f"{path}: not a dsnot-deploy pack: expected magic {MAGIC!r}, found {head[:8]!r}")
    if len(head) != HEADER_SIZE:
        raise UserInputError(f"{path}: truncated pack: {pack_size} bytes, the header alone is {HEADER_SIZE}")
    _magic, version, _flags, size, digest, n_records = _HEADER.unpack_from(head)
    (crc,) = struct.unpack_from("<I", head, _HEADER.size)
    if crc != zlib.crc32(head[:_HEADER.size]):
        raise UserInputError(f"{path}: corrupt pack: header checksum does not match")
    if version != FORMAT_VERSION:
        raise UserInputError(f"{path}: pack format version {version}, this tool reads version {FORMAT_VERSION}")
    return PackHeader(version, size, digest.hex(), n_records)


def iter_records(fh: BinaryIO, path: Path, pack_size: int, header: PackHeader, with_payloads: bool = True):
    """Yield (descriptor, payloads) of every record after validating sizes; the end record last."""
    count = 0
    covered = 0
    while True:
        pos = fh.tell()
        head = fh.read(_REC.size)
        if len(head) != _REC.size:
            raise UserInputError(f"{path}: truncated pack: record {count} header missing at byte {pos} "
                                 f"(the pack has {pack_size} bytes)")
        dlen, dcrc = _REC.unpack(head)
        if dlen > MAX_DESCRIPTOR or pos + _REC.size + dlen > pack_size:
            raise UserInputError(f"{path}: truncated or corrupt pack: record {count} claims a descriptor of "
                                 f"{dlen} bytes at byte {pos} (pack has {pack_size} bytes)")
        dbytes = fh.read(dlen)
        if zlib.crc32(dbytes) != dcrc:
            raise UserInputError(f"{path}: corrupt pack: record {count} descriptor checksum does not match")
        try:
            desc = json.loads(dbytes)
        except ValueError:
            raise UserInputError(f"{path}: corrupt pack: record {count} descriptor is not JSON") from None
        if not isinstance(desc, dict):
            raise UserInputError(f"{path}: corrupt pack: record {count} descriptor is not an object")
        if desc.get("k") == "end":
            if desc.get("n") != count or count != header.n_records or desc.get("size") != header.original_size:
                raise UserInputError(f"{path}: corrupt pack: end record says {desc.get('n')} records, "
                                     f"found {count}, header says {header.n_records}")
            if covered != header.original_size:
                raise UserInputError(f"{path}: corrupt pack: records restore {covered} bytes, "
                                     f"header says {header.original_size}")
            if fh.tell() != pack_size:
                raise UserInputError(f"{path}: corrupt pack: {pack_size - fh.tell()} bytes after the end record")
            yield desc, []
            return
        try:
            length = _as_int(desc, "len")
            off = _as_int(desc, "off")
            tail = _as_int(desc, "tz", 0, MAX_TAIL) if "tz" in desc else 0
            streams = desc["s"]
            if not isinstance(streams, list) or len(streams) > 8:
                raise CorruptPack("streams")
            for s in streams:
                if not (isinstance(s, list) and len(s) == 3 and isinstance(s[0], str)
                        and all(isinstance(x, int) and x >= 0 for x in s[1:])):
                    raise CorruptPack(f"stream entry {s!r}")
                if s[1] > 4 * length + 4096:
                    raise CorruptPack(f"stream {s[0]!r} claims {s[1]} bytes for a {length}-byte segment")
        except (CorruptPack, KeyError) as exc:
            raise UserInputError(f"{path}: corrupt pack: record {count} ({exc})") from None
        if off != covered or covered + length + tail > header.original_size:
            raise UserInputError(f"{path}: corrupt pack: record {count} covers bytes at {off}, expected {covered}")
        stored = sum(s[2] for s in streams)
        if fh.tell() + stored > pack_size:
            raise UserInputError(f"{path}: truncated pack: record {count} ({desc.get('name', desc.get('k'))}) "
                                 f"needs {stored} bytes of streams, {pack_size - fh.tell()} remain")
        if with_payloads:
            payloads = [fh.read(s[2]) for s in streams]
        else:
            fh.seek(stored, 1)
            payloads = []
        covered += length + tail
        count += 1
        yield desc, payloads


def unpack(src: Path, dst: Path, *, force: bool = False, progress: bool = False) -> PackHeader:
    """Restore the original GGUF from a pack; verifies every checksum; atomic (nothing on failure)."""
    from tqdm import tqdm

    src = Path(src)
    if not src.is_file():
        raise UserInputError(f"expected a pack file, found no file at {src}")
    check_output_file(dst, force)
    pack_size = src.stat().st_size
    with open(src, "rb") as fin:
        header = read_header(fin, src, pack_size)
        sha = hashlib.sha256()
        with atomic_file(dst, force) as out, tqdm(total=header.original_size, unit="B", unit_scale=True,
                                                  desc="unpack", disable=not progress) as bar, \
                ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
            # pipeline: up to DECODE_WORKERS records decode in worker threads while the oldest one is
            # hashed and written here (numpy, zstd, hashlib and file writes release the GIL); at most
            # DECODE_WORKERS + 1 records are in memory at once
            pending: deque[Future] = deque()
            for desc, payloads in iter_records(fin, src, pack_size, header):
                if desc.get("k") == "end":
                    break
                pending.append(pool.submit(decode_record, desc, payloads))
                if len(pending) > DECODE_WORKERS:
                    _emit(pending.popleft(), out, sha, bar, src)
            while pending:
                _emit(pending.popleft(), out, sha, bar, src)
            if sha.hexdigest() != header.sha256:
                raise UserInputError(f"{src}: corrupt pack: sha256 of the restored file {sha.hexdigest()[:16]}... "
                                     f"differs from the original's {header.sha256[:16]}...")
    return header


def _emit(fut: Future, out: BinaryIO, sha: Any, bar: Any, src: Path) -> None:
    try:
        buffers = fut.result()
    except CorruptPack as exc:
        raise UserInputError(f"{src}: corrupt pack: {exc}") from None
    for buf in buffers:
        sha.update(buf)
        out.write(buf)
        bar.update(len(memoryview(buf).cast("B")))


def read_pack_index(src: Path) -> tuple[PackHeader, list[dict[str, Any]], int]:
    """Header, descriptors (without the end record) and size of a pack; payloads are skipped."""
    src = Path(src)
    if not src.is_file():
        raise UserInputError(f"expected a pack file, found no file at {src}")
    pack_size = src.stat().st_size
    with open(src, "rb") as fin:
        header = read_header(fin, src, pack_size)
        descs = [d for d, _ in iter_records(fin, src, pack_size, header, with_payloads=False) if d.get("k") != "end"]
    return header, descs, pack_size


def is_pack(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(8) == MAGIC
    except OSError:
        return False


def size_breakdown(records: list[dict[str, Any]], pack_size: int) -> dict[str, int]:
    """Stored bytes by role: metadata (the GGUF header), raw (tensors/bytes stored whole), side
    (scales), mask, values, and overhead (pack header, record descriptors, stream framing)."""
    out = {"metadata": 0, "raw": 0, "side": 0, "mask": 0, "values": 0}
    for d in records:
        for name, _, stored in d["s"]:
            if name == "raw":
                out["metadata" if d.get("k") == "raw" and d["off"] == 0 else "raw"] += stored
            elif name in out:
                out[name] += stored
            else:
                raise UserInputError(f"corrupt pack: record {str(d.get('name', d.get('k')))[:80]!r} has a stream "
                                     f"named {name[:80]!r}")
    out["overhead"] = pack_size - sum(out.values())
    return out
