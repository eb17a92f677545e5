"""Sparse GGUF packs: block layouts, codecs, byte-identical round trips, rejection of bad packs."""

from __future__ import annotations

import hashlib
import itertools
from pathlib import Path

import gguf
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from converters import pack_codecs as C
from converters.gguf_read import read_gguf_layout
from converters.pack_blocks import LAYOUTS
from converters.sparse_pack import HEADER_SIZE, pack_gguf, read_pack_index, unpack
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from tests import pack_fixtures as F


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def roundtrip(src: Path, tmp: Path) -> list[dict]:
    pk, out = tmp / (src.stem + ".pack"), tmp / (src.stem + ".restored.gguf")
    summary = pack_gguf(src, pk, force=True)
    unpack(pk, out, force=True)
    assert sha(out) == sha(src)
    assert out.read_bytes() == src.read_bytes()
    return [d for d in summary.records if d["k"] == "tensor"]


# ---- block layouts ------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", F.QTYPES)
def test_split_join_is_a_bijection_on_any_bytes(qtype: str) -> None:
    lay = LAYOUTS[qtype]
    b = np.random.default_rng(1).integers(0, 256, (40, lay.block_bytes), dtype=np.uint8)
    side, codes = lay.split(b)
    assert codes.shape == (40, lay.block_elems) and side.shape == (40, lay.side_bytes)
    assert int(codes.max()) < (1 << lay.code_bits)
    assert lay.join(side, codes).tobytes() == b.tobytes()


@pytest.mark.parametrize("qtype", F.QTYPES)
def test_zero_code_is_exactly_the_dequantized_zero(qtype: str) -> None:
    """Codes are in element order: code == zero_code exactly where gguf-py dequantizes to 0."""
    rng = np.random.default_rng(2)
    w = F.unstructured(rng, 4, 512, 0.5)
    raw = F.encode(rng, w, qtype)
    deq = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).reshape(-1)
    lay = LAYOUTS[qtype]
    codes = lay.split(np.ascontiguousarray(raw).view(np.uint8).reshape(-1, lay.block_bytes))[1].reshape(-1)
    assert np.array_equal(codes == lay.zero_code, deq == 0)
    assert np.array_equal(deq == 0, w.reshape(-1) == 0) or qtype in ("Q4_0", "Q5_0", "Q8_0")  # quantizers may add zeros
    assert (deq[w.reshape(-1) == 0] == 0).all()  # pruned zeros survive every zero-keeping type


@pytest.mark.parametrize("qtype", ["Q6_K", "Q3_K"])
def test_hand_built_k_quants_dequantize_to_their_codes(qtype: str) -> None:
    rng = np.random.default_rng(3)
    lim = 32 if qtype == "Q6_K" else 4
    q = rng.integers(-lim, lim, (3, 256))
    scales = rng.integers(1, 31, (3, 16))
    d = np.array([0.5, 0.25, 1.0])
    blocks = F.q6_k_blocks(q, scales, d) if qtype == "Q6_K" else F.q3_k_blocks(q, scales, d)
    deq = gguf.quants.dequantize(blocks.reshape(-1), gguf.GGMLQuantizationType[qtype]).reshape(3, 16, 16)
    expect = d[:, None, None] * scales[:, :, None] * q.reshape(3, 16, 16)
    np.testing.assert_allclose(deq, expect, rtol=1e-3)


# ---- codecs -------------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 70000), max_size=40), st.integers(1, 3))
def test_gaps_round_trip_with_long_runs(gaps: list[int], tail: int) -> None:
    pos = np.cumsum(np.array(gaps, np.int64) + 1) - 1
    n = int(pos[-1]) + tail if pos.size else tail
    kept = np.zeros(n, bool)
    kept[pos] = True
    stream, mk, count = C.gaps_encode_mask(kept)
    assert np.array_equal(C.gaps_decode_mask(stream, mk, count, n), kept)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2000), st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_bitmask_and_gaps_round_trip(n: int, p: float, seed: int) -> None:
    kept = np.random.default_rng(seed).random(n) < p
    assert np.array_equal(C.bitmask_decode(C.bitmask_encode(kept), n), kept)
    stream, mk, count = C.gaps_encode_mask(kept)
    assert np.array_equal(C.gaps_decode_mask(stream, mk, count, n), kept)


def test_2of4_codes_cover_all_six_patterns_and_pack_three_per_byte() -> None:
    combos = list(itertools.combinations(range(4), 2))
    zero = np.zeros((len(combos), 4), bool)
    for i, c in enumerate(combos):
        zero[i, list(c)] = True
    zero = zero.reshape(-1)
    codes = C.nm_codes(zero, 2, 4)
    assert sorted(codes.tolist()) == list(range(6))
    stream, kept = C.nm_encode(zero, 2, 4)
    assert stream.size == 2 and int(stream.max()) < 216  # 6 codes -> 2 bytes of base-6 triples
    assert np.array_equal(kept, ~zero)
    assert np.array_equal(C.nm_decode(stream, 2, 4, 6), ~zero)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8), (2, 8), (6, 8)]), st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_nm_codes_round_trip_with_extra_zeros(nm: tuple[int, int], groups: int, seed: int) -> None:
    n, m = nm
    rng = np.random.default_rng(seed)
    zero = np.zeros((groups, m), bool)
    for g in range(groups):
        zero[g, rng.choice(m, rng.integers(n, m + 1), replace=False)] = True  # >= n zeros per group
    zero = zero.reshape(-1)
    stream, kept = C.nm_encode(zero, n, m)
    assert np.array_equal(C.nm_decode(stream, n, m, groups), kept)
    assert (~kept <= zero).all() and ((~kept).reshape(-1, m).sum(1) == n).all()


def test_mask_cost_is_within_5_percent_of_the_entropy_bound() -> None:
    rng = np.random.default_rng(4)
    for s in (0.5, 0.7, 0.9):
        zero = F.unstructured(rng, 256, 1024, s).reshape(-1) == 0
        kept = ~zero
        bound = C.binary_entropy_bits(int(zero.sum()), zero.size)
        bm = len(C.compress(C.bitmask_encode(kept), 3)) * 8
        gp = len(C.compress(C.gaps_encode_mask(kept)[0], 3)) * 8
        assert min(bm, gp) <= 1.05 * bound, (s, bm / bound, gp / bound)
    zero = F.n_m(rng, 256, 1024, 2, 4).reshape(-1) == 0
    stream, _ = C.nm_encode(zero, 2, 4)
    bound = C.entropy_bits(C.nm_codes(zero, 2, 4))
    assert len(C.compress(stream, 3)) * 8 <= 1.05 * bound


def test_mask_bound_sees_group_structure_and_extra_zeros() -> None:
    from converters.pack_records import mask_bound_bits

    rng = np.random.default_rng(6)
    iid = rng.random(1 << 18) < 0.3
    assert mask_bound_bits(iid, 1024) == pytest.approx(C.binary_entropy_bits(int(iid.sum()), iid.size), rel=2e-3)
    zero = F.n_m(rng, 256, 1024, 2, 4).reshape(-1) == 0
    groups = zero.size // 4
    assert mask_bound_bits(zero, 1024) == pytest.approx(C.entropy_bits(C.nm_codes(zero, 2, 4)), rel=1e-3)
    assert mask_bound_bits(zero, 1024) <= groups * np.log2(6) < C.binary_entropy_bits(int(zero.sum()), zero.size)
    extra = zero | (rng.random(zero.size) < 0.02)  # quantization adds zeros in kept slots
    pattern_only = C.entropy_bits(C.nm_codes(extra, 2, 4))
    full = mask_bound_bits(extra, 1024)
    assert pattern_only < full < C.binary_entropy_bits(int(extra.sum()), extra.size)
    # a bitmask under zstd reaches the group-symbol bound within 5%, which the pattern codes alone
    # (which leave the extra zeros to the values) would understate
    assert len(C.compress(C.bitmask_encode(~extra), 3)) * 8 <= 1.05 * full
    assert mask_bound_bits(zero, 6) == C.binary_entropy_bits(int(zero.sum()), zero.size)  # rows of 6: no groups


def test_record_bound_matches_the_encoding_written() -> None:
    from converters.gguf_read import TensorInfo
    from converters.pack_records import PackLevels, encode_tensor, mask_bound_bits

    rng = np.random.default_rng(7)
    for kind, w in (("u", F.unstructured(rng, 64, 512, 0.6)), ("2:4", F.n_m(rng, 64, 512, 2, 4))):
        data = np.ascontiguousarray(F.encode(rng, w, "Q8_0")).tobytes()
        info = TensorInfo("t", (512, 64), int(gguf.GGMLQuantizationType.Q8_0), "Q8_0", 0, 0, len(data))
        rec = encode_tensor(info, data, PackLevels(values=3, side=3, meta=3))
        zero = LAYOUTS["Q8_0"].split(np.frombuffer(data, np.uint8).reshape(-1, 34))[1].reshape(-1) == 0
        expected = (C.entropy_bits(C.nm_codes(zero, *rec.desc["nm"])) if rec.desc["mask"] == "nm"
                    else mask_bound_bits(zero, 512))
        assert rec.desc["eb"][0] == pytest.approx(expected, abs=0.1), kind


# ---- round trips ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def every_type_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(5)
    tensors = []
    for qt in F.QTYPES:
        for label, w in (
            ("dense", F.unstructured(rng, 4, 512, 0.0)),
            ("u30", F.unstructured(rng, 4, 512, 0.3)),
            ("u50", F.unstructured(rng, 8, 512, 0.5)),
            ("u70", F.unstructured(rng, 4, 512, 0.7)),
            ("u95", F.unstructured(rng, 4, 1024, 0.95)),
            ("nonuniform", F.nonuniform(rng, 12, 256)),
            ("2of4", F.n_m(rng, 8, 512, 2, 4)),
            ("4of8", F.n_m(rng, 8, 512, 4, 8)),
            ("zeros", np.zeros((2, 256), np.float32)),
        ):
            tensors.append((f"{label}.{qt}", F.encode(rng, w, qt), qt))
    tensors += [
        ("odd.f32", rng.standard_normal(7).astype(np.float32), "F32"),
        ("odd.f16", F.encode(rng, F.unstructured(rng, 3, 5, 0.4), "F16"), "F16"),
        ("odd.bf16", F.encode(rng, F.unstructured(rng, 5, 3, 0.4), "BF16"), "BF16"),
        ("odd.3d", F.unstructured(rng, 6, 4, 0.5).reshape(2, 3, 4), "F32"),
        ("empty", np.zeros((0, 4), np.float32), "F32"),
    ]
    return F.write_gguf(tmp_path_factory.mktemp("every") / "every.gguf", tensors)


def test_every_type_round_trips_byte_identical(every_type_gguf: Path, tmp_path: Path) -> None:
    recs = {d["name"]: d for d in roundtrip(every_type_gguf, tmp_path)}
    for qt in F.QTYPES:
        assert recs[f"u50.{qt}"]["enc"] == "sparse"
        assert recs[f"2of4.{qt}"].get("nm") == [2, 4], qt
        if qt in ("F32", "F16", "BF16"):  # quantizers may add zeros that break the exact 4:8 count
            assert recs[f"4of8.{qt}"].get("nm") == [4, 8], qt
        assert recs[f"u95.{qt}"].get("mask") == "gaps", qt
    assert {d.get("mask") for d in recs.values()} >= {"bitmask", "gaps", "nm"}


def test_sparse_pack_is_smaller_than_the_gguf(every_type_gguf: Path, tmp_path: Path) -> None:
    s = pack_gguf(every_type_gguf, tmp_path / "p.pack")
    assert s.pack_size < 0.75 * s.original_size
    assert sum(s.breakdown().values()) == s.pack_size


def _q8_gguf(path: Path, data: np.ndarray, **kw) -> Path:
    return F.write_gguf(path, [("w", data, "Q8_0")], **kw)


def test_non_canonical_blocks_round_trip(tmp_path: Path) -> None:
    """Random bytes (NaN/inf scales, -0.0 floats, codes that are not what a quantizer writes)."""
    rng = np.random.default_rng(6)
    tensors = []
    for qt in F.QTYPES:
        bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qt]]
        raw = rng.integers(0, 256, (4, 512 // bs * ts), dtype=np.uint8)
        raw[:, : raw.shape[1] // 2] = 0  # many zero codes too
        tensors.append((f"rand.{qt}", raw, qt if qt != "F32" else "F32"))
    neg = np.full((2, 64), -0.0, np.float16)
    neg[0, ::2] = 0.0
    tensors = [(n, d if q != "F32" else d.view(np.float32), q) for n, d, q in tensors]
    tensors.append(("negzero", neg, "F16"))
    src = F.write_gguf(tmp_path / "rand.gguf", tensors)
    roundtrip(src, tmp_path)


def test_padding_trailing_bytes_and_alignment_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    tensors = [(f"t{i}", F.encode(rng, F.unstructured(rng, 2, 96, 0.5), "F16"), "F16") for i in range(3)]
    src = F.write_gguf(tmp_path / "a.gguf", tensors, alignment=64)
    layout = read_gguf_layout(src)
    data = bytearray(src.read_bytes())
    t0 = layout.tensors[0]
    data[t0.start + t0.nbytes] = 0xAB  # non-zero padding after a tensor
    data += b"trailing bytes no tensor claims"
    src.write_bytes(bytes(data))
    roundtrip(src, tmp_path)


def test_tensorless_gguf_round_trips(tmp_path: Path) -> None:
    roundtrip(F.write_gguf(tmp_path / "meta.gguf", []), tmp_path)


# ---- bad inputs ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_pack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(8)
    d = tmp_path_factory.mktemp("small")
    src = F.write_gguf(d / "s.gguf", [(f"w{q}", F.encode(rng, F.n_m(rng, 4, 256, 2, 4), q), q)
                                      for q in ("Q8_0", "F16", "Q4_0")])
    pack_gguf(src, d / "s.pack")
    return d / "s.pack"


def test_truncated_packs_are_rejected_and_nothing_is_written(small_pack: Path, tmp_path: Path, capsys) -> None:
    blob = small_pack.read_bytes()
    for cut in (0, 5, HEADER_SIZE - 1, HEADER_SIZE + 3, len(blob) // 3, len(blob) // 2, len(blob) - 1):
        bad = tmp_path / f"cut{cut}.pack"
        bad.write_bytes(blob[:cut])
        out = tmp_path / f"cut{cut}.gguf"
        assert main(["unpack", str(bad), str(out), "-q"]) == 2, cut
        assert not out.exists() and not list(tmp_path.glob(".cut*"))
    err = capsys.readouterr().err
    assert "truncated" in err and "Traceback" not in err


def test_altered_packs_are_rejected_and_nothing_is_written(small_pack: Path, tmp_path: Path) -> None:
    blob = small_pack.read_bytes()
    for pos in np.linspace(0, len(blob) - 1, 41).astype(int):
        bad = bytearray(blob)
        bad[pos] ^= 0x5A
        p = tmp_path / "bad.pack"
        p.write_bytes(bytes(bad))
        out = tmp_path / "bad.gguf"
        with pytest.raises(UserInputError):
            unpack(p, out)
        assert not out.exists()
    assert len(list(tmp_path.iterdir())) == 1  # no temporary left behind


def test_trailing_garbage_is_rejected(small_pack: Path, tmp_path: Path) -> None:
    p = tmp_path / "x.pack"
    p.write_bytes(small_pack.read_bytes() + b"\0")
    with pytest.raises(UserInputError, match="after the end record"):
        unpack(p, tmp_path / "x.gguf")


def test_bad_gguf_inputs_exit_2(tmp_path: Path, every_type_gguf: Path, capsys) -> None:
    notgguf = tmp_path / "x.gguf"
    notgguf.write_bytes(b"NOPE" + bytes(100))
    assert main(["pack", str(notgguf), str(tmp_path / "x.pack"), "-q"]) == 2
    assert "magic" in capsys.readouterr().err
    blob = every_type_gguf.read_bytes()
    for cut in (10, 200, len(blob) - 100):
        t = tmp_path / f"t{cut}.gguf"
        t.write_bytes(blob[:cut])
        assert main(["pack", str(t), str(tmp_path / "t.pack"), "-q"]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert not (tmp_path / "t.pack").exists()
    huge = bytearray(blob[:64])
    huge[8:16] = (10**15).to_bytes(8, "little")  # absurd tensor count: rejected before allocating
    (tmp_path / "h.gguf").write_bytes(bytes(huge))
    assert main(["pack", str(tmp_path / "h.gguf"), str(tmp_path / "h.pack"), "-q"]) == 2


def test_cli_round_trip_and_force(every_type_gguf: Path, tmp_path: Path, capsys) -> None:
    pk, out = tmp_path / "m.pack", tmp_path / "m.gguf"
    assert main(["pack", str(every_type_gguf), str(pk), "-q"]) == 0
    assert main(["unpack", str(pk), str(out), "-q"]) == 0
    assert out.read_bytes() == every_type_gguf.read_bytes()
    assert "verified" in capsys.readouterr().out
    assert main(["unpack", str(pk), str(out), "-q"]) == 2  # exists, no --force
    assert main(["pack", str(every_type_gguf), str(pk), "-q", "--force", "--values-level", "1"]) == 0
    header, _descs, _ = read_pack_index(pk)
    assert header.original_size == every_type_gguf.stat().st_size


def test_pack_streams_one_tensor_at_a_time(tmp_path: Path) -> None:
    """Peak memory follows the largest tensor, not the file: 48 tensors of 1 MB each, 2 threads (records
    held weigh at most 2 x 2 tensors; the rest is the two encoders' temporaries)."""
    import tracemalloc

    rng = np.random.default_rng(9)
    w = F.encode(rng, F.unstructured(rng, 512, 1024, 0.5), "F16")
    src = F.write_gguf(tmp_path / "big.gguf", [(f"t{i}", w, "F16") for i in range(48)])
    from converters.pack_records import FAST_LEVELS, PackLevels

    tracemalloc.start()
    pack_gguf(src, tmp_path / "big.pack", levels=PackLevels(**FAST_LEVELS), threads=2)
    unpack(tmp_path / "big.pack", tmp_path / "big2.gguf")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 22 * w.nbytes < src.stat().st_size / 2


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(F.QTYPES), st.integers(1, 5), st.integers(1, 3), st.sampled_from(["random", "u", "2:4", "4:8", "zeros"]),
       st.floats(0.0, 1.0), st.integers(0, 2**32 - 1))
def test_any_tensor_encodes_to_a_record_that_restores_it(qtype: str, rows: int, blocks: int, kind: str, s: float,
                                                         seed: int) -> None:
    """Property: encode -> decode is the identity for arbitrary bytes and for sparse weights of every type."""
    from converters.gguf_read import TensorInfo
    from converters.pack_records import PackLevels, decode_record, encode_tensor

    rng = np.random.default_rng(seed)
    bs, ts = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[qtype]]
    cols = blocks * max(bs, 8)
    if kind == "random":
        data = rng.integers(0, 256, rows * cols // bs * ts, dtype=np.uint8).tobytes()
    else:
        w = {"u": lambda: F.unstructured(rng, rows, cols, s), "2:4": lambda: F.n_m(rng, rows, cols, 2, 4),
             "4:8": lambda: F.n_m(rng, rows, cols, 4, 8), "zeros": lambda: np.zeros((rows, cols), np.float32)}[kind]()
        data = np.ascontiguousarray(F.encode(rng, w, qtype)).tobytes()
    info = TensorInfo("t", (cols, rows), int(gguf.GGMLQuantizationType[qtype]), qtype, 0, 0, len(data))
    rec = encode_tensor(info, data, PackLevels(values=1, side=1, meta=1))
    assert b"".join(bytes(memoryview(b).cast("B")) for b in decode_record(rec.desc, rec.payloads)) == data
