"""Records of the sparse pack (docs/pack-format.md): one GGUF segment encoded as a JSON descriptor
and zstd streams, and decoded back to exactly its bytes. A tensor of a zero-keeping type becomes
block scales (`side`), positions (`mask`: bitmask, gaps or N:M codes, the smallest) and the codes of
the kept weights (`values`), or falls back to `raw` when that is smaller or does not round-trip."""

from __future__ import annotations

import json
import logging
import struct
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from dsnot_deploy.errors import UserInputError

from .gguf_read import TensorInfo
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

RECORD_HEAD = struct.Struct("<II")  # descriptor length, CRC-32 of the descriptor
MAX_DESCRIPTOR = 1 << 20
RAW_CHUNK = 64 << 20  # raw segments are cut into records of at most this many bytes
MAX_TAIL = 4096  # padding after a tensor up to this size rides in the tensor's record
FLOAT_TYPES = {"F32": 4, "F16": 2, "BF16": 2}
NM_GROUPS = (4, 8)
SCATTER_CHUNK = 1 << 20  # weights per step of the vectorised scatter/histograms (bounds temporaries)
PROBE_LEVEL = 3  # zstd level at which the candidates of a tensor are compared
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
        return RECORD_HEAD.pack(len(d), zlib.crc32(d)) + d + b"".join(self.payloads)


# ---- encoding -----------------------------------------------------------------------------------

def _stream(name: str, raw: bytes | np.ndarray, level: int, threads: int = 1) -> tuple[list[Any], bytes]:
    raw_len = raw.nbytes if isinstance(raw, np.ndarray) else len(raw)
    blob = compress(raw, level, threads)
    return [name, raw_len, len(blob)], blob


def whole_record(kind: str, offset: int, data: bytes, level: int, extra: dict[str, Any] | None = None,
                planes: int = 1, threads: int = 1) -> Record:
    """A segment stored whole (one `raw` stream); `threads`: zstd workers for a huge stream (same bytes)."""
    arr = np.frombuffer(data, np.uint8)
    body = arr if planes == 1 else to_planes(arr.view(f"<u{planes}"))
    entry, blob = _stream("raw", body, level, threads)
    desc = {"k": kind, "off": offset, "len": len(data), "crc": zlib.crc32(data), "s": [entry]}
    if planes != 1:
        desc["planes"] = planes
    if extra:
        desc.update(extra)
    return Record(desc, [blob])


def _sparse_record(base: dict[str, Any], lay: BlockLayout, side: np.ndarray, flat: np.ndarray, kept: np.ndarray,
                   mask_kind: str, mask_stream: np.ndarray, mask_fields: dict[str, Any],
                   levels: PackLevels, threads: int = 1) -> Record:
    streams, blobs = [], []
    parts = ([("side", to_planes_2d(side), levels.side)] if lay.side_bytes else []) + [
        ("mask", mask_stream, levels.mask), ("values", to_planes(flat[kept]), levels.values)]
    for name, data, level in parts:
        entry, blob = _stream(name, data, level, threads)
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


def encode_tensor(info: TensorInfo, data: bytes, levels: PackLevels, threads: int = 1) -> Record:
    """Encode one tensor's bytes: the smallest of raw and the sparse candidates that round-trips.
    `threads`: zstd workers for a huge stream; the record's bytes do not depend on it.

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
        return whole_record("tensor", info.start, data, lv.raw, {**base, "enc": "raw"}, planes, threads)

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
        if len(compress(g_stream, levels.mask, threads)) < len(compress(bm_stream, levels.mask, threads)):
            mask_choice = ("gaps", g_stream, {"mk": minority_kept, "mc": count})
    candidates.append((lambda lv, mc=mask_choice: _sparse_record(base, lay, side, flat, kept, mc[0], mc[1], mc[2], lv,
                                                                 threads),
                       mask_bound_bits(zero, info.dims[0]), kept))
    for m in NM_GROUPS:
        nmin = nm_min_zeros(zero, info.dims[0], m)
        if nmin >= 1 and nm_supported(nmin, m) and n % m == 0:
            stream, kept_nm = nm_encode(zero, nmin, m)
            candidates.append((
                lambda lv, st=stream, k=kept_nm, nm=[nmin, m]: _sparse_record(base, lay, side, flat, k, "nm", st,
                                                                              {"nm": nm}, lv, threads),
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

def as_int(desc: dict[str, Any], key: str, lo: int = 0, hi: int = 1 << 62) -> int:
    v = desc.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CorruptPack(f"record field {key!r} is {v!r}, expected an integer in [{lo}, {hi}]")
    return v


def decode_record_bytes(desc: dict[str, Any], payloads: list[bytes]) -> bytes | np.ndarray:
    """Restore a record's bytes (segment + tail) from its descriptor and stream payloads."""
    length = as_int(desc, "len")
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
        kept = gaps_decode_mask(mask_stream, bool(desc.get("mk")), as_int(desc, "mc", 0, n), n)
    elif kind == "nm":
        nm = desc.get("nm")
        if not (isinstance(nm, list) and len(nm) == 2 and all(isinstance(x, int) for x in nm) and nm_supported(*nm)):
            raise CorruptPack(f"record N:M {nm!r}")
        if n % nm[1]:
            raise CorruptPack(f"{n} weights do not split into groups of {nm[1]}")
        kept = nm_decode(mask_stream, nm[0], nm[1], n // nm[1])
    else:
        raise CorruptPack(f"unknown mask kind {kind!r}")
    n_kept = as_int(desc, "kept", 0, n)
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
        tail_len = as_int(desc, "tz", 0, MAX_TAIL) if "tz" in desc else 0
    except CorruptPack:
        raise
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise CorruptPack(f"record {desc.get('name', desc.get('k'))!r} does not decode ({exc})") from None
    if len(memoryview(body).cast("B")) != desc.get("len") or zlib.crc32(body) != desc.get("crc"):
        raise CorruptPack(f"record {desc.get('name', desc.get('k'))!r}: CRC-32 of the restored bytes does not match")
    return [body, bytes(tail_len)] if tail_len else [body]


