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

`--threads N` records are encoded at once (held ones weigh at most 2N x the largest record's bytes,
so small records flow past a big one still encoding; written in order; zstd's own workers
for huge streams, whose frames do not depend on their number): the pack's bytes are the same for any
N, and peak memory is a small multiple of N times the largest tensor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from dsnot_deploy.atomic import atomic_file, check_output_file
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.progress import Progress, open_bar

from .gguf_read import GGUFLayout, TensorInfo, read_gguf_layout
from .pack_codecs import CorruptPack
from .pack_records import (
    MAX_DESCRIPTOR,
    MAX_TAIL,
    RAW_CHUNK,
    RECORD_HEAD,
    PackLevels,
    Record,
    as_int,
    decode_record,
    encode_tensor,
    whole_record,
)
from .pack_threads import ordered_map, resolve_threads

log = logging.getLogger(__name__)

MAGIC = b"DSNPACK\x00"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<8sIIQ32sQ")  # magic, version, flags, original size, original sha256, records
HEADER_SIZE = _HEADER.size + 4  # + CRC-32 of the fields above
DECODE_WORKERS = 2  # records decoded in parallel by unpack (the main thread hashes and writes)


@dataclass
class PackSummary:
    """What `pack_gguf` wrote; `records` are the descriptors (with per-stream stored sizes)."""

    original_size: int
    pack_size: int
    sha256: str
    records: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the pack
    threads: int = 1  # records encoded at once

    @property
    def mb_per_s(self) -> float:
        """MB (1e6 bytes) of GGUF packed per second."""
        return self.original_size / 1e6 / max(self.seconds, 1e-9)

    def breakdown(self) -> dict[str, int]:
        return size_breakdown(self.records, self.pack_size)


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


@dataclass(frozen=True)
class _Job:
    """One record to encode: a tensor's bytes (with `tail` zero bytes of padding after it) or a raw chunk."""

    kind: str  # "tensor" or "raw"
    offset: int
    data: bytes
    level: int  # zstd level of a raw chunk
    info: TensorInfo | None = None
    tail: int = 0


def _jobs(fin: BinaryIO, src: Path, segs: list[tuple[str, int, int, TensorInfo | None]], levels: PackLevels,
          sha: Any) -> Iterator[_Job]:
    """The records of `segs` in file order; every byte read is hashed here, in order."""
    i = 0
    while i < len(segs):
        kind, start, end, info = segs[i]
        fin.seek(start)
        if kind == "tensor":
            data = _read_exact(fin, end - start, src)
            sha.update(data)
            tail = 0
            if i + 1 < len(segs) and segs[i + 1][0] == "raw" and segs[i + 1][2] - segs[i + 1][1] <= MAX_TAIL:
                pad = _read_exact(fin, segs[i + 1][2] - segs[i + 1][1], src)
                if not pad.strip(b"\x00"):
                    sha.update(pad)
                    tail = len(pad)
                    i += 1
            yield _Job("tensor", start, data, levels.raw, info, tail)
        else:
            level = levels.meta if start == 0 else levels.raw
            for off in range(start, end, RAW_CHUNK):
                data = _read_exact(fin, min(RAW_CHUNK, end - off), src)
                sha.update(data)
                yield _Job("raw", off, data, level)
        i += 1


def _encode_job(job: _Job, levels: PackLevels, threads: int) -> tuple[Record, int]:
    """(record, bytes of the GGUF it covers); runs in a worker thread."""
    if job.kind == "tensor":
        rec = encode_tensor(job.info, job.data, levels, threads)
        if job.tail:
            rec.desc["tz"] = job.tail
    else:
        rec = whole_record("raw", job.offset, job.data, job.level, threads=threads)
    return rec, len(job.data) + job.tail


def pack_gguf(src: Path, dst: Path, *, force: bool = False, levels: PackLevels | None = None,
              progress: Progress = False, threads: int | None = None) -> PackSummary:
    """Pack the GGUF `src` into `dst` (atomic). Returns the summary of what was written.

    `threads` (default: every core this process may use) records are encoded at once, those held
    in memory weighing at most 2 * `threads` x the largest record, written in file order; huge
    streams also use that many zstd workers. The pack's bytes are the same for any number of threads.
    """
    threads = resolve_threads(threads)
    levels = levels or PackLevels()
    layout = read_gguf_layout(src)
    check_output_file(dst, force)
    segs = _segments(layout)
    sha = hashlib.sha256()
    records: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with open(src, "rb") as fin, atomic_file(dst, force) as out, \
            open_bar(progress, f"pack ({threads} thread{'s' if threads > 1 else ''})", layout.file_size,
                     unit="B", unit_scale=True) as bar:
        out.write(bytes(HEADER_SIZE))
        largest = max(end - start + MAX_TAIL if kind == "tensor" else min(RAW_CHUNK, end - start)
                      for kind, start, end, _ in segs)
        encoded = ordered_map(partial(_encode_job, levels=levels, threads=threads),
                              _jobs(fin, src, segs, levels, sha), threads,
                              weight=lambda job: len(job.data) + job.tail, budget=2 * threads * largest)
        for rec, covered in encoded:
            _write_record(out, rec, records)
            bar.update(covered)
        end_rec = Record({"k": "end", "n": len(records), "size": layout.file_size}, [])
        out.write(end_rec.to_bytes())
        digest = sha.digest()
        out.seek(0)
        out.write(_header_bytes(layout.file_size, digest, len(records)))
        out.seek(0, 2)
        pack_size = out.tell()
    seconds = time.perf_counter() - t0
    log.info("packed %s: %.1f MB in %.1f s (%.2f MB/s, %d threads)", src.name, layout.file_size / 1e6, seconds,
             layout.file_size / 1e6 / max(seconds, 1e-9), threads)
    return PackSummary(layout.file_size, pack_size, digest.hex(), records, seconds=seconds, threads=threads)


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
        head = fh.read(RECORD_HEAD.size)
        if len(head) != RECORD_HEAD.size:
            raise UserInputError(f"{path}: truncated pack: record {count} header missing at byte {pos} "
                                 f"(the pack has {pack_size} bytes)")
        dlen, dcrc = RECORD_HEAD.unpack(head)
        if dlen > MAX_DESCRIPTOR or pos + RECORD_HEAD.size + dlen > pack_size:
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
            length = as_int(desc, "len")
            off = as_int(desc, "off")
            tail = as_int(desc, "tz", 0, MAX_TAIL) if "tz" in desc else 0
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


def unpack(src: Path, dst: Path, *, force: bool = False, progress: Progress = False) -> PackHeader:
    """Restore the original GGUF from a pack; verifies every checksum; atomic (nothing on failure)."""
    src = Path(src)
    if not src.is_file():
        raise UserInputError(f"expected a pack file, found no file at {src}")
    check_output_file(dst, force)
    pack_size = src.stat().st_size
    with open(src, "rb") as fin:
        header = read_header(fin, src, pack_size)
        sha = hashlib.sha256()
        with atomic_file(dst, force) as out, \
                open_bar(progress, "unpack", header.original_size, unit="B", unit_scale=True) as bar:
            # pipeline: up to DECODE_WORKERS records decode in worker threads while the oldest one is
            # hashed and written here (numpy, zstd, hashlib and file writes release the GIL); at most
            # DECODE_WORKERS + 1 records are in memory at once
            records = _records_before_end(fin, src, pack_size, header)
            try:
                for buffers in ordered_map(_decode, records, DECODE_WORKERS, max_in_flight=DECODE_WORKERS + 1):
                    for buf in buffers:
                        sha.update(buf)
                        out.write(buf)
                        bar.update(len(memoryview(buf).cast("B")))
            except CorruptPack as exc:
                raise UserInputError(f"{src}: corrupt pack: {exc}") from None
            if sha.hexdigest() != header.sha256:
                raise UserInputError(f"{src}: corrupt pack: sha256 of the restored file {sha.hexdigest()[:16]}... "
                                     f"differs from the original's {header.sha256[:16]}...")
    return header


def _records_before_end(fin: BinaryIO, src: Path, pack_size: int,
                        header: PackHeader) -> Iterator[tuple[dict[str, Any], list[bytes]]]:
    for desc, payloads in iter_records(fin, src, pack_size, header):
        if desc.get("k") == "end":
            return
        yield desc, payloads


def _decode(record: tuple[dict[str, Any], list[bytes]]) -> Any:
    return decode_record(*record)


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
