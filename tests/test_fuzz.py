"""Short fuzz runs of the file readers (the long run is scripts/fuzz_readers.py; see tests/fuzz_targets.py).

Every input is a mutation of a valid file; the property: the reader succeeds or raises a DsnotError
(exit code 2 through the CLI), within an address-space cap, and a failed unpack writes nothing.
"""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings

from tests import fuzz_targets as ft

SHORT = settings(max_examples=200, deadline=None, derandomize=True, database=None,
                 phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> ft.Seeds:
    return ft.make_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz_work")


def test_seeds_are_valid_and_fields_found(seeds: ft.Seeds, work: Path) -> None:
    path = work / "seed.gguf"
    path.write_bytes(seeds.gguf)
    for fn in ft.GGUF_TARGETS.values():
        assert ft.run_target(fn, path) == "accepted"
    pack = work / "seed.pack"
    pack.write_bytes(seeds.pack)
    assert ft.run_target(ft.target_unpack, pack) == "accepted"
    # 3 counts/version, 7 keys + values, 3 tensors with 2 dims: the walker found the header integers
    assert len(seeds.gguf_fields) > 30
    assert len(seeds.pack_fields) >= 4 + 4  # header + at least header/tensor/end records
    assert {d.get("mask") for _s, _l, d, _e in ft.pack_records(seeds.pack)} >= {"bitmask", "nm", "gaps"}


def test_mutators_change_the_file(seeds: ft.Seeds) -> None:
    off, width = seeds.gguf_fields[1]  # tensor count
    out = ft.mutate_gguf(seeds.gguf, seeds.gguf_fields, [("int", 1, (1 << 64) - 1)])
    assert out[off:off + width] == b"\xff" * 8 and len(out) == len(seeds.gguf)
    p = ft.mutate_pack(seeds.pack, seeds.pack_fields, [("desc", 1, 0, "set", 1 << 40)], True)
    assert p != seeds.pack and ft.fix_pack_crcs(p) == p


@SHORT
@given(plan=ft.gguf_plans())
def test_fuzz_gguf_readers(seeds: ft.Seeds, work: Path, plan: list) -> None:
    path = work / "m.gguf"
    path.write_bytes(ft.mutate_gguf(seeds.gguf, seeds.gguf_fields, plan))
    for fn in ft.GGUF_TARGETS.values():
        ft.run_target(fn, path)  # raises ft.Crash on anything but success or a DsnotError


@SHORT
@given(plan=ft.pack_plans())
def test_fuzz_unpack(seeds: ft.Seeds, work: Path, plan: tuple) -> None:
    folder = work / "unpack"
    folder.mkdir(exist_ok=True)
    path = folder / "m.pack"
    path.write_bytes(ft.mutate_pack(seeds.pack, seeds.pack_fields, *plan))
    ft.run_target(ft.target_unpack, path)


# ---- regressions: crashes the fuzzer found, each now a clean error ------------------------------

def _zstd_frame_declaring(size: int) -> bytes:
    """A zstd frame header whose content size field (8 bytes, single segment) says `size`."""
    return b"\x28\xb5\x2f\xfd" + bytes([0xE0]) + struct.pack("<Q", size) + b"\x01\x00\x00"


def test_regression_zstd_frame_declaring_a_huge_size_is_refused_before_allocation() -> None:
    from converters.pack_codecs import CorruptPack, decompress

    with ft.address_space_cap(), pytest.raises(CorruptPack, match="declares"):
        decompress(_zstd_frame_declaring(1 << 36), 100)  # 64 GiB: MemoryError before the fix


def _pack_with_descriptor(seeds: ft.Seeds, index: int, change: dict) -> bytes:
    start, dlen, desc, _end = ft.pack_records(seeds.pack)[index]
    desc.update(change)
    new = json.dumps(desc, separators=(",", ":")).encode()
    b = seeds.pack[:start] + struct.pack("<II", len(new), zlib.crc32(new)) + new + seeds.pack[start + 8 + dlen:]
    return ft.fix_pack_crcs(b)


@pytest.mark.parametrize("change", [{"type": None}, {"dims": ["a"]}, {"eb": 3}, {"zeros": "x"}, {"mask": None},
                                    {"s": [["valueS", 1, 1]]}])
def test_regression_inspect_of_a_pack_with_garbled_descriptor_fields(seeds: ft.Seeds, tmp_path: Path,
                                                                     change: dict) -> None:
    from converters.pack_inspect import inspect_pack
    from dsnot_deploy.errors import UserInputError

    tensor_index = next(i for i, r in enumerate(ft.pack_records(seeds.pack)) if r[2].get("k") == "tensor")
    path = tmp_path / "m.pack"
    path.write_bytes(_pack_with_descriptor(seeds, tensor_index, change))
    with pytest.raises(UserInputError, match="corrupt pack"):  # KeyError/TypeError before the fix
        inspect_pack(path)


# scripts/fuzz_readers.py input (a mutated seed, zlib + base64): gguf-py's reader, handed it directly,
# loops over a corrupt count past the end of the file and ends in MemoryError under the address-space cap
GGUF_PY_MEMORY_ERROR = (
    "eNqdVXtQVGUUv8sSPgtQcAQd3opMwwoKksneu3fvCksGmQyWaS0LXhZi2eWxOxYhDBaiWBlTDmmEEEmBoAETKbH3gxp0hCRimgZf"
    "U+IfoqOVPAQfVN89u3vdZUWdvplvv/P4nd855zt7742NTYoREwTBb37NtpwellPD6thctVaixlunzmJ5/xyLL82Ynx+ax7Lb3S0G"
    "rVadpZakaPWpmapUvVFncMZGkQ2bGZCq1xnYtwwqLavTGNJ5jAzv5XYYtcHA6gwZep1Eq36bzVXp9LlZqtysPBWbnZeh1etcMLKx"
    "OzjKWouBzTNI0rRqzSw+pafVqs9kdRn5bK5Eo8nSSkDNm2Npc74F5GQFhwlSuCCtEqTVghQhSJGCtEaQogTpOUFaKxaYwx6I4fPs"
    "i9erDVCci8088KIIohNvP5l1NmrJDjZDk27g6f2mzc12WW0pj8Dz0yGc7W2pNnjZNDycLsSTrKKYWZytPhVwkrTVk+7UoOsf+iJe"
    "Tjjr0XljbjInzj+M/jCuA9vikRpO2jVAeuSUUBVVYi5m+BjF2/3vtJIDcRqQJ5NItOp2JpqphkM/b4WcG9XBKPukM1fVoqQ6VyDK"
    "NaQGYo6sb6RcnJVUe1opWdhezWmr2yl07S5ly7Gy4RBguWdWgD07vkfoI7S8Ar3ChoB/QccBOMXDU0Lf0uM9AleCy9Od/OnqslKw"
    "HY26Rg2J69HVLWaOwptKKfDOo0knrwAk2tjFNTXsE/pTnvaA2MFQGjVGDFJjxwlqes+jV2oBP+uej4NPM+cz08KJBJL+NlzwKS+v"
    "tcOVeb4Keml1G2Li5gq93Ex8jzS+746+6H8XuRaXoImsveT52u/IuJh6wIu2ljjkaxxqsps5U1YL+pn0UahR1RWPeuVlVMS5jzn/"
    "8Qbp6aItKPiEE3p2PLrjlB+H0kYPkhnR50w8tq7AC+7vr22fQk0lAzlc3K5hyvv+BlMO2wz35nRxAGrYVL6HekfBSK/Uv0lxN0zk"
    "7TtL7Wr7oXECjTcbgSenoATVji+l1gXGc5FNv3PTezh1YYRrujSJjNu/gpojY14ydY9/xC3YPCBwiiducau9Fwn6XuNZ9GXb89Ry"
    "VYJg0xmPoMLyWwL/vxcXWp8u4tgqJZd9zs3h/hZpqkyTbiLoW/xJKPUBQSDvQPNzUP/PEu6FUw/4xvZ3oK9DDlGelb3gT6Ur0ME3"
    "hqDmtX0xwJEoqqOm7n3j0GPfgR+5668FykL967j5L1eioq4Ecqe7rylx5x7g+lNk7uOgnCCG5LyUScfhs4MmCDfoYpn0BG3m2k3n"
    "M3fB1kvnKQjChHH9imqGtyAsB8KklNjzOeMFrCeZdfJK8P8K3NvolGj+fBGzxGLLUXpEnqwws+9jhiBPDvZV0kosH8aSCPO0QCwj"
    "O4/PDcxVqeWpYyYsdXnLVVQZWQZaKWSrIYNAq8K/BbTBMo39in7I9QtTJYvELGO4lihmk/A/7mc6FAmQaxhH9MguWOJGyDPAdl32"
    "Oo4fwxmKmBrsC2fMflpaJPNVtAGmAccr8fbFdadh9BrgS4bbiJe3Mj04rhls6VhqpWoU8Zb+G+g+qMQUlYyZbmPM9xhRId8BvEtk"
    "8bS1zt8YflKjeIfh2GCyFdfhIfvJ4p9N5WLpEtTuC3eVFN0nqwd9FxNJ/y0340w4dhmTsj4DdBZ/P1pnfOHzPy1+NpZiG9n6pSbu"
    "+z7uw9Hk42h8qshWC/J5VDz/EzHfzlbsCItbbIv/f8svwDb8/kMQ2iD7JF0OiG7/GQoU1mWM2PxA9SLGrK/qJ+9gMOhhVnPWK/xb"
    "lfB3I2aGwBoKeEyS4v8AUXvdzA=="
)


def test_regression_gguf_py_reader_is_not_fed_unchecked_counts(tmp_path: Path) -> None:
    import base64

    from converters.gguf_info import read_gguf_info
    from dsnot_deploy.errors import UserInputError

    path = tmp_path / "m.gguf"
    path.write_bytes(zlib.decompress(base64.b64decode("".join(GGUF_PY_MEMORY_ERROR))))
    # Before the fix this input made gguf-py's reader (which trusts the header's counts) run until
    # MemoryError; that upstream behaviour is not asserted here (under the cap, pytest's own handling
    # of the MemoryError can fail too, which made such an assertion flaky).
    with ft.address_space_cap(), pytest.raises(UserInputError, match="not a valid GGUF"):
        read_gguf_info(path)
