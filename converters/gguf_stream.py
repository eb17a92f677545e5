"""Stream tensors from a checkpoint into a GGUF a few rows at a time, and verify what was written.

Memory: every tensor moves in chunks of whole rows of at most ``CHUNK_BYTES`` of float32 (read
with plain file reads, rewritten, quantized, written, freed), so the peak is a few chunks, whatever
the size of the model or of its largest tensor.  Rows are independent for every type gguf-py writes
(F32/F16/BF16 element by element, Q8_0/Q4_0/Q5_0/Q4_1/Q5_1 in blocks along a row), so the bytes are
the same as quantizing the tensor whole.

Verification, streamed too: while writing, each chunk's bytes are dequantized and compared with the
checkpoint's values (pruned zeros kept, new zeros, written exactly) and a CRC-32 of the tensor's
bytes is kept; afterwards the file's tensor table is read back (names, shapes, types, offsets) and
each tensor's bytes are re-read from the file and their CRC compared.  For a file llama.cpp's
quantizer wrote, ``verify_file`` reads the file back chunk by chunk and compares with the checkpoint.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from dsnot_deploy.errors import DsnotError

from .gguf_arch import ArchSpec, llama3_rope_factors
from .gguf_lattice import LEVELS as LATTICE_EXACT
from .gguf_lattice import encode_exact
from .gguf_read import GGUFLayout, read_gguf_layout
from .gguf_zeros import ZeroCount, ZeroTally, same_values
from .hf_source import HFCheckpoint, stored_zero_count, to_float32

CHUNK_BYTES = 32 << 20  # float32 bytes of one chunk of rows
_READ_BYTES = 16 << 20
_PREFIX = 1 << 16  # values compared first when checking that a chunk was written exactly (most are not)
_SAME_WIDTH = {("F32", Q.F32), ("F16", Q.F16)}  # stored bytes are the written bytes (no conversion)


class StreamTensor(Protocol):
    """What the streamer needs of a planned tensor (gguf_export.PlannedTensor)."""

    hf_name: str | None  # None: computed (rope_freqs)
    gguf_name: str
    shape: tuple[int, ...]
    qtype: Q
    pruned: bool


@dataclass
class Written:
    """What was written for one tensor: its CRC-32, byte count and (pruned weights) its zero tally."""

    name: str
    crc: int
    nbytes: int
    zeros: ZeroCount | None


def row_ranges(rows: int, row_numel: int, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
    step = max(1, chunk_bytes // max(4 * row_numel, 1))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class TensorSource:
    """A checkpoint tensor after the export's rewrites, read by rows."""

    def __init__(self, ckpt: HFCheckpoint, spec: ArchSpec, t: StreamTensor) -> None:
        self.ckpt, self.spec, self.t = ckpt, spec, t
        self.ref = ckpt.tensors[t.hf_name] if t.hf_name is not None else None
        self.streamed = self.ref is not None and self.ref.offset >= 0 and len(t.shape) >= 2
        self.rows = t.shape[0] if self.streamed else 1
        self.row_numel = int(np.prod(t.shape[1:])) if self.streamed else int(np.prod(t.shape))
        self.order = spec.row_order(t.hf_name, self.rows, ckpt.text_config) if self.streamed else None
        self._whole: np.ndarray | None = None

    def ranges(self, chunk_bytes: int = CHUNK_BYTES) -> Iterator[tuple[int, int]]:
        return row_ranges(self.rows, self.row_numel, chunk_bytes) if self.streamed else iter([(0, 1)])

    def raw(self, start: int, stop: int) -> np.ndarray:
        """Rows as stored (after the permutation, before any value rewrite)."""
        assert self.streamed and self.ref is not None
        if self.order is None:
            return self.ckpt.read_raw_rows(self.ref.name, start, stop)
        idx = self.order[start:stop]
        lo, hi = int(idx.min()), int(idx.max()) + 1
        return self.ckpt.read_raw_rows(self.ref.name, lo, hi)[idx - lo]

    def values(self, start: int, stop: int, raw: np.ndarray | None = None) -> np.ndarray:
        """Rows as float32, shape (stop - start, row_numel); a tensor that is not streamed comes whole."""
        t = self.t
        if not self.streamed:
            if t.hf_name is None:
                whole = llama3_rope_factors(self.ckpt.text_config)
            else:
                whole = self.spec.transform(t.hf_name, self.ckpt.load(t.hf_name), self.ckpt.text_config)
            return np.ascontiguousarray(whole, dtype=np.float32).reshape(t.shape)
        assert self.ref is not None and t.hf_name is not None
        raw = self.raw(start, stop) if raw is None else raw
        return self.spec.rewrite_values(t.hf_name, to_float32(raw, self.ref.dtype))

    @property
    def same_width(self) -> bool:
        """The stored bytes are the bytes to write (F16 -> F16, F32 -> F32, no value rewrite)."""
        return (self.streamed and self.ref is not None and (self.ref.dtype, self.t.qtype) in _SAME_WIDTH
                and not self.spec.rewrites_values(self.t.hf_name or ""))


def encode(values: np.ndarray, qtype: Q, exact: bool = False) -> np.ndarray:
    """Values -> the bytes ggml stores for them (gguf-py's quantizers, byte-identical to ggml's).

    F16 goes through torch's conversion (several times faster than numpy's on sparse data, and the same
    round-to-nearest-even bits for every number); a chunk holding a NaN goes through numpy's, whose NaN
    payloads are what gguf-py writes.  With ``exact``, Q4_0 / Q5_0 blocks already on the lattice at another
    fp16 scale are written exactly (``gguf_lattice``); every other block is gguf-py's.
    """
    values = np.ascontiguousarray(values, dtype=np.float32)
    if qtype == Q.F16:
        import torch

        if values.size == 0 or not np.isnan(np.max(values)):  # max is NaN iff a value is
            return torch.from_numpy(values).half().numpy().view(np.uint8)
    if exact and qtype in LATTICE_EXACT:  # on-lattice blocks at scales ggml would not pick: kept as they are
        return encode_exact(values, qtype)
    data = gguf.quants.quantize(values, qtype)
    return np.ascontiguousarray(data).view(np.uint8)


def decode(data: np.ndarray, qtype: Q, shape: tuple[int, ...]) -> np.ndarray:
    return np.asarray(gguf.quants.dequantize(data, qtype), dtype=np.float32).reshape(shape)


def tally_chunk(tally: ZeroTally, values: np.ndarray, data: np.ndarray, qtype: Q) -> None:
    """Count one chunk's zeros from the written bytes: F16 and Q8_0 from their bits (zero iff the value
    bits are 0; Q8_0: the quant is 0 under a finite scale, or the scale is 0), other types dequantized."""
    if qtype == Q.F16:
        import torch

        half = data.view(np.uint16).reshape(-1)
        src = values.reshape(-1)

        def exact(n: int | None = None) -> bool:
            return same_values(torch.from_numpy(half[:n].view(np.int16)).view(torch.float16).float().numpy(), src[:n])

        tally.add_masks(src == 0, (half & np.uint16(0x7FFF)) == 0, lambda: exact(_PREFIX) and exact())
    elif qtype == Q.Q8_0:
        blocks = data.reshape(-1, 34)
        scale = blocks[:, :2].view(np.uint16)  # (n_blocks, 1) float16 bits
        quants = blocks[:, 2:].view(np.int8)
        finite = (scale & np.uint16(0x7C00)) != np.uint16(0x7C00)
        is_zero = ((quants == 0) & finite) | ((scale & np.uint16(0x7FFF)) == 0)
        src = values.reshape(-1, 32)

        def exact_q8(n: int | None = None) -> bool:
            return same_values(quants[:n].astype(np.float32) * scale[:n].view(np.float16).astype(np.float32), src[:n])

        tally.add_masks(src == 0, is_zero, lambda: exact_q8(_PREFIX // 32) and exact_q8())
    else:
        tally.add(values, decode(data, qtype, values.shape))


Encoder = Callable[[np.ndarray, Q], np.ndarray]


def stream_tensor(fout: Any, src: TensorSource, verify: bool, encoder: Encoder = encode) -> Written:
    """Write one tensor's bytes (rows in chunks) at the current position of ``fout``."""
    t = src.t
    tally = ZeroTally(t.gguf_name, t.qtype.name) if (verify and t.pruned) else None
    crc, nbytes = 0, 0
    for start, stop in src.ranges():
        if src.same_width:
            raw = src.raw(start, stop)
            data = raw.view(np.uint8)
            if tally is not None:
                tally.add_identical(raw.size, stored_zero_count(raw))
        else:
            values = src.values(start, stop)
            data = encoder(values, t.qtype)
            if tally is not None:
                tally_chunk(tally, values, data, t.qtype)
            del values
        data = np.ascontiguousarray(data)
        if verify:
            crc = zlib.crc32(data, crc)
        fout.write(memoryview(data).cast("B"))
        nbytes += data.nbytes
        del data
    return Written(t.gguf_name, crc, nbytes, tally.result() if tally is not None else None)


@contextlib.contextmanager
def one_torch_thread() -> Iterator[None]:
    """torch's conversions here are one pass over a chunk: a second OpenMP thread gains little and, on a
    busy machine, its barrier spin costs several times the work (SmolLM2 F16 at load 7 on 2 cores: 6-7 s
    of writing with two threads, 1.2 s with one).  The caller's setting is restored."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _pad(fout: Any, alignment: int) -> None:
    pad = -fout.tell() % alignment
    if pad:
        fout.write(b"\0" * pad)


def stream_tensors(
    writer: gguf.GGUFWriter, ckpt: HFCheckpoint, spec: ArchSpec, tensors: list[StreamTensor], verify: bool,
    on_tensor: Callable[[], None] = lambda: None, encoder: Encoder = encode,
) -> list[Written]:
    """Write every tensor's data after the writer's header, metadata and tensor infos (already written,
    in the same order), aligned as gguf-py aligns them; the writer's own per-tensor bookkeeping is not used."""
    assert writer.fout is not None and len(writer.fout) == 1
    fout = writer.fout[0]
    alignment = writer.data_alignment
    written = []
    with one_torch_thread():
        for t in tensors:
            _pad(fout, alignment)
            w = stream_tensor(fout, TensorSource(ckpt, spec, t), verify, encoder)
            block, type_size = gguf.GGML_QUANT_SIZES[t.qtype]
            if w.nbytes != int(np.prod(t.shape)) // block * type_size:
                raise AssertionError(f"{t.gguf_name}: planned {int(np.prod(t.shape)) // block * type_size} bytes, "
                                     f"encoded {w.nbytes}")
            written.append(w)
            on_tensor()
    _pad(fout, alignment)
    return written


def _file_crc(fh: Any, start: int, nbytes: int) -> int:
    fh.seek(start)
    crc, left = 0, nbytes
    while left:
        chunk = fh.read(min(left, _READ_BYTES))
        if not chunk:
            break
        crc = zlib.crc32(chunk, crc)
        left -= len(chunk)
    return crc


def check_layout(path: Path, tensors: list[StreamTensor]) -> GGUFLayout:
    """The file's tensor table must be the plan: same names in order, shapes, types."""
    layout = read_gguf_layout(path)
    got = [(ti.name, ti.shape, ti.type_id) for ti in layout.tensors]
    want = [(t.gguf_name, tuple(t.shape), int(t.qtype)) for t in tensors]
    if got != want:
        bad = next(i for i, (a, b) in enumerate(zip(got, want + [None] * len(got))) if a != b)
        raise DsnotError(f"{path}: tensor table differs from the plan at entry {bad}: {got[bad] if bad < len(got) else None} "
                         f"written, {want[bad] if bad < len(want) else None} planned")
    return layout


def check_written_bytes(path: Path, layout: GGUFLayout, written: list[Written]) -> None:
    """Re-read every tensor's bytes from the file at the offsets its table gives and compare CRC-32s."""
    with open(path, "rb") as fh:
        for ti, w in zip(layout.tensors, written):
            if ti.nbytes != w.nbytes or _file_crc(fh, ti.start, w.nbytes) != w.crc:
                raise DsnotError(f"{path}: the bytes of {ti.name} read back differ from the bytes written")


def verify_file(path: Path, layout: GGUFLayout, sources: dict[str, TensorSource]) -> list[ZeroCount]:
    """Zero counts of a file written by someone else (llama.cpp's quantizer): each named tensor is read
    back from the file by rows, dequantized and compared with the checkpoint's rows."""
    counts = []
    with open(path, "rb") as fh, one_torch_thread():
        for ti in layout.tensors:
            src = sources.get(ti.name)
            if src is None:
                continue
            qtype = Q(ti.type_id)
            block, type_size = gguf.GGML_QUANT_SIZES[qtype]
            row_bytes = ti.dims[0] // block * type_size
            n_rows = ti.n_elements // ti.dims[0]
            tally = ZeroTally(ti.name, qtype.name)
            for start, stop in src.ranges():
                rows = (start, stop) if src.streamed else (0, n_rows)
                fh.seek(ti.start + rows[0] * row_bytes)
                data = np.frombuffer(fh.read((rows[1] - rows[0]) * row_bytes), dtype=np.uint8)
                values = src.values(start, stop)
                tally.add(values, decode(data.reshape(rows[1] - rows[0], row_bytes), qtype, values.shape))
            counts.append(tally.result())
    return counts
