"""`pack --threads`: the same pack bytes for any thread count, bounded records in flight, bad values rejected."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from converters import pack_codecs
from converters.pack_records import PackLevels
from converters.pack_threads import available_cores, ordered_map, resolve_threads
from converters.sparse_pack import pack_gguf, unpack
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from tests import pack_fixtures as F

LOW = PackLevels(meta=3, raw=1, side=1, mask=1, values=1)  # fast: the bytes, not the ratio, are tested


@pytest.fixture(scope="module")
def mixed_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Twelve tensors of several types and sparsities (sparse, N:M and raw records, tails)."""
    rng = np.random.default_rng(16)
    tensors = []
    for i, qt in enumerate(("Q8_0", "F16", "Q4_0", "BF16", "F32", "Q5_0") * 2):
        w = F.n_m(rng, 8, 512, 2, 4) if i % 3 == 0 else F.unstructured(rng, 8 + i, 512, 0.1 * (i % 7))
        tensors.append((f"t{i}.{qt}", F.encode(rng, w, qt), qt))
    return F.write_gguf(tmp_path_factory.mktemp("threads") / "mixed.gguf", tensors, alignment=64)


def _pack(src: Path, dst: Path, threads: int, levels: PackLevels = LOW) -> bytes:
    pack_gguf(src, dst, force=True, levels=levels, threads=threads)
    return dst.read_bytes()


def test_pack_bytes_do_not_depend_on_threads_and_round_trip(mixed_gguf: Path, tmp_path: Path) -> None:
    packs = {n: _pack(mixed_gguf, tmp_path / f"p{n}.pack", n) for n in (1, 2, 3)}
    assert packs[1] == packs[2] == packs[3]
    assert _pack(mixed_gguf, tmp_path / "default.pack", None) == packs[1]  # type: ignore[arg-type]
    unpack(tmp_path / "p3.pack", tmp_path / "restored.gguf")
    assert (tmp_path / "restored.gguf").read_bytes() == mixed_gguf.read_bytes()


def test_default_levels_give_the_same_bytes_on_2_threads(mixed_gguf: Path, tmp_path: Path) -> None:
    assert _pack(mixed_gguf, tmp_path / "a.pack", 1, PackLevels()) == _pack(mixed_gguf, tmp_path / "b.pack", 2,
                                                                         PackLevels())


def test_huge_streams_use_zstd_workers_with_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """zstd's multi-threaded frames (streams >= MT_MIN_BYTES) do not depend on the number of workers."""
    rng = np.random.default_rng(17)
    w = F.unstructured(rng, 768, 4096, 0.5)  # 1.5 MiB of Q8_0 codes kept, 3 MiB of F16 values
    src = F.write_gguf(tmp_path / "big.gguf", [("q8", F.encode(rng, w, "Q8_0"), "Q8_0"),
                                               ("f16", F.encode(rng, w, "F16"), "F16")])
    level3 = PackLevels(meta=3, raw=3, side=3, mask=3, values=3)  # at level 1 small jobs happen to match
    single = _pack(src, tmp_path / "single.pack", 1, level3)
    monkeypatch.setattr(pack_codecs, "MT_MIN_BYTES", 1 << 20)
    monkeypatch.setattr(pack_codecs, "MT_JOB_BYTES", 512 << 10)  # zstd's smallest job
    packs = {n: _pack(src, tmp_path / f"mt{n}.pack", n, level3) for n in (1, 2, 3)}
    assert packs[1] == packs[2] == packs[3]
    assert packs[1] != single  # the multi-threaded frames were really written
    unpack(tmp_path / "mt2.pack", tmp_path / "restored.gguf")
    assert (tmp_path / "restored.gguf").read_bytes() == src.read_bytes()


@pytest.mark.parametrize("bad", ["0", "-1", "-4"])
def test_bad_threads_exit_2_and_write_nothing(mixed_gguf: Path, tmp_path: Path, capsys, bad: str) -> None:
    out = tmp_path / "x.pack"
    assert main(["pack", str(mixed_gguf), str(out), "-q", "--threads", bad]) == 2
    err = capsys.readouterr().err
    assert "--threads" in err and ">= 1" in err and bad in err and "Traceback" not in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_non_integer_threads_is_a_usage_error(mixed_gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["pack", str(mixed_gguf), str(tmp_path / "x.pack"), "-q", "--threads", "two"])
    assert exc.value.code == 2


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_resolve_threads_rejects_bad_values(bad: object) -> None:
    with pytest.raises(UserInputError, match="--threads"):
        resolve_threads(bad)  # type: ignore[arg-type]


def test_default_threads_is_every_available_core() -> None:
    assert resolve_threads(None) == available_cores() >= 1
    assert resolve_threads(5) == 5


def test_cli_reports_threads_and_speed(mixed_gguf: Path, tmp_path: Path, capsys) -> None:
    assert main(["pack", str(mixed_gguf), str(tmp_path / "c.pack"), "-q", "--threads", "2", "--fast"]) == 0
    out = capsys.readouterr().out
    assert "MB/s on 2 threads" in out


def test_progress_bar_counts_every_byte_and_names_the_threads(mixed_gguf: Path, tmp_path: Path) -> None:
    bars: list[dict] = []

    class Bar:
        def __init__(self, desc: str, total: int | None = None, unit: str = "it", unit_scale: bool = False) -> None:
            self.state = {"desc": desc, "total": total, "unit": unit, "scale": unit_scale, "n": 0}
            bars.append(self.state)

        def update(self, n: int = 1) -> None:
            self.state["n"] += n

        def close(self) -> None:
            pass

    pack_gguf(mixed_gguf, tmp_path / "b.pack", levels=LOW, threads=3, progress=Bar)
    (bar,) = bars
    assert bar["n"] == bar["total"] == mixed_gguf.stat().st_size
    assert bar["unit"] == "B" and bar["scale"] and "3 threads" in bar["desc"]  # tqdm then shows MB/s


def test_ordered_map_keeps_order_and_bounds_items_in_flight() -> None:
    taken: list[int] = []
    yielded: list[int] = []
    max_in_flight = 0

    def items():
        nonlocal max_in_flight
        for i in range(40):
            taken.append(i)
            max_in_flight = max(max_in_flight, len(taken) - len(yielded))
            yield i

    def slow_square(i: int) -> int:
        time.sleep(0.001 * ((i * 7) % 5))  # finish out of order
        return i * i

    for r in ordered_map(slow_square, items(), workers=3):
        yielded.append(r)
    assert yielded == [i * i for i in range(40)]
    assert max_in_flight <= 6


def test_ordered_map_runs_in_parallel_and_raises_at_the_failing_item() -> None:
    names: set[str] = set()

    def work(i: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.01)
        if i == 5:
            raise UserInputError("item 5 is bad")
        return i

    got: list[int] = []
    with pytest.raises(UserInputError, match="item 5"):
        for r in ordered_map(work, range(100), workers=2):
            got.append(r)
    assert got == [0, 1, 2, 3, 4]
    assert len(names) == 2


def test_one_worker_is_the_plain_map_in_this_thread() -> None:
    me = threading.current_thread().name
    assert list(ordered_map(lambda i: (i, threading.current_thread().name), range(3), workers=1)) == \
        [(0, me), (1, me), (2, me)]


def test_ordered_map_weight_budget_lets_small_items_pass_a_big_one_and_bounds_held_weight() -> None:
    """Item 0 (weight 10) finishes only once item 15 has started: a count bound of a few items would
    stall behind it; a weight budget of 30 lets the small items flow, and never holds more than 30."""
    started_15 = threading.Event()
    held: list[int] = []
    weights = {i: (10 if i == 0 else 1) for i in range(40)}
    taken: list[int] = []
    yielded: list[int] = []

    def items():
        for i in range(40):
            held.append(sum(weights[j] for j in taken) - sum(weights[j] for j in yielded))  # submitted, not yielded
            taken.append(i)
            yield i

    def work(i: int) -> tuple[int, bool]:
        if i == 15:
            started_15.set()
        return i, (started_15.wait(timeout=5.0) if i == 0 else True)

    for i, ok in ordered_map(work, items(), workers=2, max_in_flight=1000, weight=weights.__getitem__, budget=30):
        yielded.append(i)
        assert ok
    assert yielded == list(range(40))
    assert max(held) <= 30
