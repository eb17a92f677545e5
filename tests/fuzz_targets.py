"""Fuzz harness for the file readers: seed files, mutators and targets (used by tests/test_fuzz.py
and scripts/fuzz_readers.py).

Seeds are VALID files: a tiny GGUF written by gguf.GGUFWriter (metadata of every kind, sparse F32,
F16 and Q8_0 tensors) and its pack written by `pack_gguf`. A mutation plan (drawn by hypothesis)
changes the seed: bit flips, byte overwrites, truncation, inserted or deleted ranges, and header
integers (counts, string and array lengths, value types, dims, tensor types and offsets, pack
header fields, record lengths, descriptor JSON fields, stream payloads) set to extreme values. For
the pack, a plan may end by recomputing the CRC-32s so the mutation reaches the deeper checks.

Property of every target: it returns normally or raises a `DsnotError`; any other exception is a
crash. Each target runs under an address-space cap (`RLIMIT_AS` = current size + `HEADROOM`), so an
allocation sized by an unchecked number from the file ends in MemoryError, i.e. a crash. A failed
`unpack` must leave neither the output nor a temporary file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import resource
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from hypothesis import strategies as st

HEADROOM = 768 << 20  # address space a target may add to the process (the seeds are a few KB)
EXTREMES_U64 = (0, 1, 2, 3, 7, 8, 31, 32, 33, 255, 256, 4096, 65535, 1 << 31, (1 << 31) - 1, (1 << 32) - 1,
                1 << 32, 1 << 40, (1 << 62), (1 << 63) - 1, 1 << 63, (1 << 64) - 1)
EXTREME_JSON = (-1, 0, 1, 2, 7, 8, 255, 4096, 4097, 1 << 31, 1 << 40, 1 << 62, (1 << 62) + 1, 1 << 64, -(1 << 63),
                1.5, float("nan"), True, None, "", "x", "Q8_0", "F32", "raw", "sparse", "bitmask", "gaps", "nm",
                [], [0], [1, 2], [2, 4], [32, 1 << 40], [-1, 32], [0, 0], [["raw", 1, 1]], {})


# ---- seeds --------------------------------------------------------------------------------------

def build_seed_gguf(path: Path) -> Path:
    """A ~6 KB GGUF: string/int/float/bool metadata, string and float arrays, and three sparse tensors
    (F32 50% unstructured, F16 2:4, Q8_0 95%) so that pack uses the bitmask, N:M and gap codings."""
    import gguf

    rng = np.random.default_rng(0)
    w32 = rng.standard_normal((8, 32)).astype(np.float32)
    w32[rng.random(w32.shape) < 0.5] = 0.0
    w16 = rng.standard_normal((8, 32)).astype(np.float32) + 3.0
    slots = np.argsort(rng.random((w16.size // 4, 4)), axis=1)[:, :2]  # 2 random zeros per group of 4
    np.put_along_axis(w16.reshape(-1, 4), slots, 0.0, axis=1)
    wq = rng.standard_normal((8, 64)).astype(np.float32)
    wq[rng.random(wq.shape) < 0.95] = 0.0
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("fuzz-seed")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_bool("test.flag", True)
    writer.add_array("tokenizer.ggml.tokens", [f"t{i}" for i in range(12)])
    writer.add_array("test.floats", [0.5, 1.5, 2.5])
    writer.add_tensor("a.weight", w32)
    writer.add_tensor("b.weight", w16.astype(np.float16))
    writer.add_tensor("c.weight", gguf.quants.quantize(wq, gguf.GGMLQuantizationType.Q8_0),
                      raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def build_seed_pack(gguf_path: Path, path: Path) -> Path:
    from converters.pack_records import FAST_LEVELS, PackLevels
    from converters.sparse_pack import pack_gguf

    pack_gguf(gguf_path, path, levels=PackLevels(**FAST_LEVELS))
    return path


@dataclass(frozen=True)
class Seeds:
    gguf: bytes
    pack: bytes
    gguf_fields: tuple[tuple[int, int], ...]  # (offset, width) of every header integer of the GGUF
    pack_fields: tuple[tuple[int, int], ...]  # pack header integers and record descriptor lengths


def make_seeds(folder: Path) -> Seeds:
    folder.mkdir(parents=True, exist_ok=True)
    g = build_seed_gguf(folder / "seed.gguf")
    p = build_seed_pack(g, folder / "seed.pack")
    gb, pb = g.read_bytes(), p.read_bytes()
    return Seeds(gb, pb, tuple(gguf_int_fields(gb)), tuple(pack_int_fields(pb)))


def gguf_int_fields(buf: bytes) -> list[tuple[int, int]]:
    """(offset, width) of every integer of a VALID GGUF's header: version, counts, every string length,
    value type, array type and count, dimension count, dim, tensor type and offset."""
    fields = [(4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(p: int) -> int:
        fields.append((p, 8))
        return p + 8 + struct.unpack_from("<Q", buf, p)[0]

    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4))
        vtype = struct.unpack_from("<I", buf, pos)[0]
        pos += 4
        if vtype == 8:
            pos = string(pos)
        elif vtype == 9:
            fields += [(pos, 4), (pos + 4, 8)]
            etype, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            for _ in range(count):
                pos = string(pos) if etype == 8 else pos + sizes[etype]
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        pos = string(pos)
        fields.append((pos, 4))
        n_dims = struct.unpack_from("<I", buf, pos)[0]
        pos += 4
        for _ in range(n_dims):
            fields.append((pos, 8))
            pos += 8
        fields += [(pos, 4), (pos + 4, 8)]
        pos += 12
    return fields


def pack_int_fields(buf: bytes) -> list[tuple[int, int]]:
    """Pack header integers (version, flags, original size, record count) and every descriptor length."""
    fields = [(8, 4), (12, 4), (16, 8), (56, 8)]
    for start, _dlen, _desc, _end in pack_records(buf):
        fields.append((start, 4))
    return fields


def pack_records(buf: bytes) -> list[tuple[int, int, dict[str, Any], int]]:
    """(record start, descriptor length, descriptor, end of its payloads) of a pack, as far as it parses."""
    out = []
    pos = 68
    while pos + 8 <= len(buf):
        dlen = struct.unpack_from("<I", buf, pos)[0]
        try:
            desc = json.loads(buf[pos + 8:pos + 8 + dlen])
            stored = sum(int(s[2]) for s in desc.get("s", []))
        except (ValueError, TypeError, AttributeError, IndexError):
            break
        end = pos + 8 + dlen + stored
        out.append((pos, dlen, desc, end))
        if desc.get("k") == "end" or end > len(buf):
            break
        pos = end
    return out


def fix_pack_crcs(buf: bytes) -> bytes:
    """Recompute the header CRC-32 and every parseable descriptor's CRC-32."""
    b = bytearray(buf)
    if len(b) >= 68:
        struct.pack_into("<I", b, 64, zlib.crc32(bytes(b[:64])))
    for start, dlen, _desc, _end in pack_records(bytes(b)):
        struct.pack_into("<I", b, start + 4, zlib.crc32(bytes(b[start + 8:start + 8 + dlen])))
    return bytes(b)


# ---- mutations ----------------------------------------------------------------------------------

def _apply_byte_op(b: bytearray, op: tuple, fields: tuple[tuple[int, int], ...]) -> bytearray:
    kind = op[0]
    n = len(b)
    if kind == "flip" and n:
        b[op[1] % n] ^= 1 << op[2]
    elif kind == "set" and n:
        at = op[1] % n
        b[at:at + len(op[2])] = op[2][: n - at]
    elif kind == "truncate":
        del b[op[1] % (n + 1):]
    elif kind == "insert":
        at = op[1] % (n + 1)
        b[at:at] = op[2]
    elif kind == "delete" and n:
        at = op[1] % n
        del b[at:at + op[2]]
    elif kind == "int" and fields:
        off, width = fields[op[1] % len(fields)]
        value = op[2] if op[2] >= 0 else n + op[2] + 1  # negative: relative to the file length
        if off + width <= n:
            b[off:off + width] = (value % (1 << (8 * width))).to_bytes(width, "little")
    return b


def mutate_gguf(seed: bytes, fields: tuple[tuple[int, int], ...], plan: list[tuple]) -> bytes:
    b = bytearray(seed)
    for op in plan:
        b = _apply_byte_op(b, op, fields)
    return bytes(b)


def mutate_pack(seed: bytes, fields: tuple[tuple[int, int], ...], plan: list[tuple], fix_crc: bool) -> bytes:
    """Byte-level ops, plus "desc" (set or delete a descriptor key, re-serialised) and "stream" ops
    (replace a payload by a valid zstd frame of changed content, or by raw bytes)."""
    b = bytearray(seed)
    for op in plan:
        if op[0] == "desc":
            b = _mutate_descriptor(b, op)
        elif op[0] == "stream":
            b = _mutate_stream(b, op)
        else:
            b = _apply_byte_op(b, op, fields)
    out = bytes(b)
    return fix_pack_crcs(out) if fix_crc else out


def _mutate_descriptor(b: bytearray, op: tuple) -> bytearray:
    recs = pack_records(bytes(b))
    if not recs:
        return b
    start, dlen, desc, _end = recs[op[1] % len(recs)]
    keys = sorted(desc) + ["len", "off", "tz", "dims", "kept", "mc", "mk", "nm", "planes", "enc", "mask", "type",
                           "s", "n", "size", "k"]
    key = keys[op[2] % len(keys)]
    if op[3] == "delete":
        desc.pop(key, None)
    elif op[3] == "stream-size" and isinstance(desc.get("s"), list) and desc["s"]:
        s = desc["s"][op[2] % len(desc["s"])]
        if isinstance(s, list) and len(s) == 3:
            s[1 + op[1] % 2] = op[5]
    else:
        desc[key] = op[4]
    new = json.dumps(desc, separators=(",", ":")).encode()
    b[start:start + 8 + dlen] = struct.pack("<II", len(new), zlib.crc32(new)) + new
    return b


def _mutate_stream(b: bytearray, op: tuple) -> bytearray:
    """Replace stream j of record i (sizes in the descriptor updated, so the record still parses)."""
    import zstandard

    from converters.pack_codecs import compress

    recs = [r for r in pack_records(bytes(b)) if isinstance(r[2].get("s"), list) and r[2]["s"]]
    if not recs:
        return b
    start, dlen, desc, end = recs[op[1] % len(recs)]
    streams = desc["s"]
    j = op[2] % len(streams)
    pay_at = start + 8 + dlen
    payloads = []
    for s in streams:
        payloads.append(bytes(b[pay_at:pay_at + s[2]]))
        pay_at += s[2]
    try:
        raw = bytearray(zstandard.ZstdDecompressor().decompress(payloads[j], max_output_size=1 << 20))
    except zstandard.ZstdError:
        raw = bytearray()
    mode, data = op[3], op[4]
    if mode == "garbage":
        new_payload = bytes(data)
        new_raw_len = streams[j][1]
    else:
        if mode == "overwrite" and raw:
            at = int.from_bytes(data[:2] or b"\0", "little") % len(raw)
            raw[at:at + len(data)] = data[: len(raw) - at]
        elif mode == "append":
            raw += data
        elif mode == "cut":
            del raw[len(raw) - min(len(raw), len(data) + 1):]
        new_payload = compress(bytes(raw), 1)
        new_raw_len = len(raw)
    payloads[j] = new_payload
    streams[j] = [streams[j][0], new_raw_len, len(new_payload)]
    new = json.dumps(desc, separators=(",", ":")).encode()
    b[start:end] = struct.pack("<II", len(new), zlib.crc32(new)) + new + b"".join(payloads)
    return b


def byte_ops(max_size: int = 64) -> st.SearchStrategy[tuple]:
    pos = st.integers(0, 1 << 20)
    blob = st.binary(min_size=1, max_size=16)
    return st.one_of(
        st.tuples(st.just("flip"), pos, st.integers(0, 7)),
        st.tuples(st.just("set"), pos, blob),
        st.tuples(st.just("truncate"), pos),
        st.tuples(st.just("insert"), pos, st.binary(min_size=1, max_size=max_size)),
        st.tuples(st.just("delete"), pos, st.integers(1, max_size)),
        st.tuples(st.just("int"), pos, st.one_of(st.sampled_from(EXTREMES_U64), st.integers(-64, -1),
                                                  st.integers(0, (1 << 64) - 1))),
    )


def gguf_plans() -> st.SearchStrategy[list[tuple]]:
    return st.lists(byte_ops(), min_size=1, max_size=4)


def pack_plans() -> st.SearchStrategy[tuple[list[tuple], bool]]:
    idx = st.integers(0, 1 << 16)
    desc_op = st.tuples(st.just("desc"), idx, idx, st.sampled_from(["set", "set", "delete", "stream-size"]),
                        st.sampled_from(EXTREME_JSON), st.sampled_from(EXTREMES_U64[:14]))
    stream_op = st.tuples(st.just("stream"), idx, idx, st.sampled_from(["overwrite", "append", "cut", "garbage"]),
                          st.binary(min_size=1, max_size=24))
    op = st.one_of(byte_ops(), desc_op, stream_op)
    return st.tuples(st.lists(op, min_size=1, max_size=3), st.booleans())


# ---- targets ------------------------------------------------------------------------------------

@contextlib.contextmanager
def address_space_cap(headroom: int = HEADROOM) -> Iterator[None]:
    """Limit the process's address space to its current size + `headroom` for the duration."""
    with open("/proc/self/status") as fh:
        vm = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = vm + headroom
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


class Crash(Exception):
    """A target broke the property (message says how); the caller saves the input."""


def run_target(fn: Any, *args: Any) -> str:
    """'accepted' or 'rejected' (a DsnotError); any other exception (or MemoryError) -> Crash."""
    from dsnot_deploy.errors import DsnotError

    try:
        with address_space_cap():
            fn(*args)
    except DsnotError:
        return "rejected"
    except Exception as exc:  # noqa: BLE001 - the point: anything else is a crash
        raise Crash(f"{type(exc).__name__}: {exc}") from exc
    return "accepted"


def target_gguf_read(path: Path) -> None:
    """`inspect FILE.gguf`: converters.gguf_read.read_gguf_layout + inspect's tensor scan."""
    from converters.pack_inspect import format_report, inspect_gguf

    format_report(inspect_gguf(path))


def target_gguf_info(path: Path) -> None:
    """`validate`'s header read: dsnot_deploy.evaluation.llamacpp_runtime.read_gguf_info (gguf-py GGUFReader)."""
    from converters.gguf_info import read_gguf_info

    read_gguf_info(path)


def target_pack(path: Path) -> None:
    """`pack FILE.gguf`: on success the pack must unpack to the input's exact bytes."""
    from converters.pack_records import FAST_LEVELS, PackLevels
    from converters.sparse_pack import pack_gguf, unpack

    out = path.with_suffix(".fuzzpack")
    back = path.with_suffix(".back")
    try:
        pack_gguf(path, out, force=True, levels=PackLevels(**FAST_LEVELS))
        unpack(out, back, force=True)
        if back.read_bytes() != path.read_bytes():
            raise AssertionError("pack accepted the file but unpack did not restore it bit-exactly")
    finally:
        out.unlink(missing_ok=True)
        back.unlink(missing_ok=True)


def target_unpack(path: Path) -> None:
    """`unpack FILE.pack` (+ `inspect FILE.pack`): on failure no output and no temporary remain; on
    success the output's sha256 is the one in the pack header."""
    from converters.pack_inspect import format_report, inspect_pack
    from converters.sparse_pack import unpack
    from dsnot_deploy.errors import DsnotError

    out = path.parent / "restored.gguf"
    out.unlink(missing_ok=True)
    before = set(os.listdir(path.parent))
    try:
        header = unpack(path, out)
    except DsnotError:
        left = set(os.listdir(path.parent)) - before
        if left:
            raise AssertionError(f"failed unpack left {sorted(left)}") from None
        raise
    finally:
        try:
            format_report(inspect_pack(path))
        except DsnotError:
            pass
    try:
        if hashlib.sha256(out.read_bytes()).hexdigest() != header.sha256:
            raise AssertionError("unpack succeeded but the output's sha256 differs from the header's")
    finally:
        out.unlink(missing_ok=True)


GGUF_TARGETS = {"gguf_read": target_gguf_read, "gguf_info": target_gguf_info, "pack": target_pack}
PACK_TARGETS = {"unpack": target_unpack}
