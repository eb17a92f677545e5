"""Position and value codecs of the sparse pack (all vectorised numpy; no loop per block or weight).

Masks (`kept` is a bool array in element order, True where the code is not the zero code):
- bitmask: `np.packbits(kept, bitorder="little")`;
- gaps: the positions of the minority symbol (kept or zero) as gaps g_i = p_i - p_{i-1} - 1
  (p_{-1} = -1), each written as floor(g/255) bytes 255 followed by one byte g % 255;
- N:M pattern codes: for every group of M consecutive weights of a row, the index (lexicographic
  rank) of the set of its N "pruned" slots among the C(M, N) sets, packed k codes per byte in base
  C (k = largest with C**k <= 256: 3 codes of 2:4 per byte, 2.67 bits per group before entropy
  coding).
Every stream is then compressed by zstd (`compress` / `decompress` with a size bound).

Values: codes wider than 8 bits are split into byte planes (all low bytes, then the next, ...)
so that the entropy coder sees the skewed high bytes (sign/exponent) apart from the noisy low ones.
"""

from __future__ import annotations

import itertools
import math
from functools import cache

import numpy as np

from dsnot_deploy.errors import UserInputError

ESC = 255


class CorruptPack(UserInputError):
    """A stream of a pack does not decode to what its record says."""


# ---- zstd -------------------------------------------------------------------------------------

# Streams of at least MT_MIN_BYTES are compressed by zstd's multi-threaded mode in jobs of MT_JOB_BYTES:
# its frames do not depend on the number of workers (>= 1), so a pack has the same bytes for any
# --threads while one huge tensor (an 8B model's embedding) still uses every core. Smaller streams
# use the single-threaded mode (one frame per stream, as before; tensors run in parallel instead).
MT_MIN_BYTES = 64 << 20
MT_JOB_BYTES = 32 << 20


def compress(data: bytes | np.ndarray, level: int, threads: int = 1) -> bytes:
    """zstd frame with content size and checksum. `threads` only changes the speed, never the bytes:
    it is the number of zstd workers for a stream of at least MT_MIN_BYTES (see above)."""
    import zstandard

    if isinstance(data, np.ndarray):  # the array's own memory, no copy
        buf: bytes | memoryview = memoryview(np.ascontiguousarray(data)).cast("B") if data.size else b""
    else:
        buf = data
    if len(buf) >= MT_MIN_BYTES:
        params = zstandard.ZstdCompressionParameters.from_level(
            level, threads=max(1, threads), job_size=MT_JOB_BYTES, write_checksum=1, write_content_size=1)
        return zstandard.ZstdCompressor(compression_params=params).compress(buf)
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(buf)


def decompress(blob: bytes, raw_len: int) -> bytes:
    """Inverse of `compress`; the result must be exactly `raw_len` bytes (checked, never exceeded)."""
    import zstandard

    if raw_len == 0 and not blob:
        return b""
    try:
        # zstandard allocates the frame's declared content size whatever max_output_size says:
        # check it against the record before decompressing (-1: not declared; pack always declares it)
        declared = zstandard.frame_content_size(blob)
        if declared != raw_len:
            raise CorruptPack(f"a compressed stream declares {declared} bytes, its record says {raw_len}")
        out = zstandard.ZstdDecompressor().decompress(blob, max_output_size=raw_len)
    except zstandard.ZstdError as exc:
        raise CorruptPack(f"a compressed stream is corrupt ({exc})") from None
    if len(out) != raw_len:
        raise CorruptPack(f"a stream decompressed to {len(out)} bytes, its record says {raw_len}")
    return out


# ---- byte planes ------------------------------------------------------------------------------

def to_planes(values: np.ndarray) -> np.ndarray:
    """(n,) unsigned ints of width w -> (w * n,) uint8: plane 0 = all least significant bytes, ..."""
    w = values.dtype.itemsize
    if w == 1:
        return values.reshape(-1)
    le = values.astype(values.dtype.newbyteorder("<"), copy=False)
    return np.ascontiguousarray(le.view(np.uint8).reshape(-1, w).T).reshape(-1)


def from_planes(planes: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Inverse of `to_planes`, by shifts and ors of whole planes (a transposing copy is 3x slower)."""
    dtype = np.dtype(dtype)
    w = dtype.itemsize
    if w == 1:
        return planes.view(dtype)
    if planes.size % w:
        raise CorruptPack(f"a plane stream of {planes.size} bytes is not a multiple of {w}")
    p = planes.reshape(w, -1)
    out = p[w - 1].astype(dtype.newbyteorder("="))
    for i in range(w - 2, -1, -1):
        out <<= 8
        out |= p[i]
    return out.astype(dtype, copy=False)


# ---- bitmask ----------------------------------------------------------------------------------

def bitmask_encode(kept: np.ndarray) -> np.ndarray:
    return np.packbits(kept, bitorder="little")


def bitmask_decode(stream: np.ndarray, n: int) -> np.ndarray:
    if stream.size != (n + 7) // 8:
        raise CorruptPack(f"bitmask of {stream.size} bytes for {n} weights")
    return np.unpackbits(stream, count=n, bitorder="little").view(bool)


# ---- gaps -------------------------------------------------------------------------------------

def gaps_encode(positions: np.ndarray) -> np.ndarray:
    """Increasing positions -> escape-coded gap bytes (see module doc)."""
    if positions.size == 0:
        return np.empty(0, np.uint8)
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    n_esc = gaps // ESC
    lengths = n_esc + 1
    out = np.full(int(lengths.sum()), ESC, np.uint8)
    ends = np.cumsum(lengths) - 1
    out[ends] = (gaps % ESC).astype(np.uint8)
    return out


def gaps_decode(stream: np.ndarray, count: int, n: int) -> np.ndarray:
    """Escape-coded gap bytes -> `count` increasing positions, all < n (checked)."""
    ends = np.flatnonzero(stream != ESC)
    if ends.size != count or (count and ends[-1] != stream.size - 1) or (not count and stream.size):
        raise CorruptPack(f"gap stream holds {ends.size} positions, its record says {count}")
    if count == 0:
        return np.empty(0, np.int64)
    prev = np.empty_like(ends)
    prev[0] = -1
    prev[1:] = ends[:-1]
    gaps = stream[ends].astype(np.int64) + ESC * (ends - prev - 1)
    pos = np.cumsum(gaps + 1) - 1
    if pos[-1] >= n:
        raise CorruptPack(f"gap stream points at weight {pos[-1]} of a tensor of {n}")
    return pos


def gaps_encode_mask(kept: np.ndarray) -> tuple[np.ndarray, bool, int]:
    """Gap-code the minority symbol of `kept`. Returns (stream, minority_is_kept, minority count)."""
    n_kept = int(np.count_nonzero(kept))
    minority_kept = n_kept <= kept.size - n_kept
    pos = np.flatnonzero(kept if minority_kept else ~kept)
    return gaps_encode(pos), minority_kept, int(pos.size)


def gaps_decode_mask(stream: np.ndarray, minority_kept: bool, count: int, n: int) -> np.ndarray:
    pos = gaps_decode(stream, count, n)
    mask = np.zeros(n, bool) if minority_kept else np.ones(n, bool)
    mask[pos] = minority_kept
    return mask


# ---- N:M pattern codes --------------------------------------------------------------------------

@cache
def nm_tables(n: int, m: int) -> tuple[np.ndarray, np.ndarray, int]:
    """(slots (C, M) bool of pruned slots per code, code_of (2**M,) int16 (-1 if not N bits set),
    codes per byte k)."""
    combos = list(itertools.combinations(range(m), n))
    slots = np.zeros((len(combos), m), bool)
    code_of = np.full(1 << m, -1, np.int16)
    for c, combo in enumerate(combos):
        slots[c, list(combo)] = True
        code_of[sum(1 << j for j in combo)] = c
    k = 1
    while len(combos) ** (k + 1) <= 256:
        k += 1
    return slots, code_of, k


def nm_supported(n: int, m: int) -> bool:
    return 0 < n < m <= 8 and math.comb(m, n) <= 256


def nm_min_zeros(zero: np.ndarray, row_len: int, m: int) -> int:
    """Smallest number of zeros in a group of m consecutive weights of a row (-1 if rows do not split)."""
    if row_len % m or zero.size == 0:
        return -1
    return int(zero.reshape(-1, m).sum(axis=1, dtype=np.int16).min())


def nm_encode(zero: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Every group has >= n zeros. Pruned slots = its first n zeros. Returns (packed codes, kept)."""
    g = zero.reshape(-1, m)
    pruned = g & (np.cumsum(g, axis=1, dtype=np.int16) <= n)
    weights = (1 << np.arange(m, dtype=np.int32))
    bits = (pruned.astype(np.int32) * weights).sum(axis=1)
    slots, code_of, k = nm_tables(n, m)
    codes = code_of[bits]
    if (codes < 0).any():
        raise ValueError(f"a group has fewer than {n} zeros: not {n}:{m}")
    return nm_pack(codes.astype(np.int64), len(slots), k), ~pruned.reshape(-1)


def nm_pack(codes: np.ndarray, c: int, k: int) -> np.ndarray:
    pad = (-codes.size) % k
    padded = np.concatenate([codes, np.zeros(pad, np.int64)]).reshape(-1, k)
    powers = c ** np.arange(k - 1, -1, -1, dtype=np.int64)
    return (padded * powers).sum(axis=1).astype(np.uint8)


def nm_decode(stream: np.ndarray, n: int, m: int, n_groups: int) -> np.ndarray:
    """Packed pattern codes -> kept mask of n_groups * m weights (one table lookup per byte)."""
    slots, _, k = nm_tables(n, m)
    c = len(slots)
    if stream.size != -(-n_groups // k):
        raise CorruptPack(f"N:M stream of {stream.size} bytes for {n_groups} groups")
    if stream.size and int(stream.max()) >= c ** k:
        raise CorruptPack(f"N:M stream holds a byte above {c ** k - 1}")
    return _nm_byte_table(n, m)[stream].reshape(-1)[: n_groups * m]


@cache
def _nm_byte_table(n: int, m: int) -> np.ndarray:
    """(256, k * m) bool: the kept mask of the k groups that one packed byte describes."""
    slots, _, k = nm_tables(n, m)
    c = len(slots)
    b = np.arange(256, dtype=np.int64)
    digits = (b[:, None] // (c ** np.arange(k - 1, -1, -1, dtype=np.int64))) % c
    return np.ascontiguousarray(~slots[digits].reshape(256, k * m))


def nm_codes(zero: np.ndarray, n: int, m: int) -> np.ndarray:
    """Pattern code of every group (for entropy measurements)."""
    g = zero.reshape(-1, m)
    pruned = g & (np.cumsum(g, axis=1, dtype=np.int16) <= n)
    bits = (pruned.astype(np.int32) * (1 << np.arange(m, dtype=np.int32))).sum(axis=1)
    return nm_tables(n, m)[1][bits]


# ---- entropy ------------------------------------------------------------------------------------

def entropy_bits(symbols: np.ndarray) -> float:
    """Total 0th-order empirical entropy in bits: sum over symbols of -log2(frequency)."""
    if symbols.size == 0:
        return 0.0
    _, counts = np.unique(symbols, return_counts=True)
    p = counts / symbols.size
    return float(-(counts * np.log2(p)).sum())


def binary_entropy_bits(k: int, n: int) -> float:
    """n * H(k/n): the 0th-order entropy of a mask of n positions with k of one kind."""
    if k <= 0 or k >= n:
        return 0.0
    p = k / n
    return float(-n * (p * math.log2(p) + (1 - p) * math.log2(1 - p)))
