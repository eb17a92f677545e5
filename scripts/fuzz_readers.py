"""Long fuzz run of the GGUF readers (inspect/pack path, validate's gguf-py path, pack) and unpack.

    python scripts/fuzz_readers.py --examples 10000 [--out fuzz_crashes] [--targets gguf unpack]

Inputs are hypothesis-drawn mutations of valid seed files (tests/fuzz_targets.py). Prints, per
target, how many inputs were tried, accepted, rejected with a clean DsnotError, and crashed; every
crash input is saved to --out with its message. Exit code 1 if anything crashed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402

from tests import fuzz_targets as ft  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=10000, help="inputs per fuzzed file kind")
    ap.add_argument("--out", type=Path, default=Path("fuzz_crashes"), help="folder for crash reproducers")
    ap.add_argument("--targets", nargs="+", choices=("gguf", "unpack"), default=["gguf", "unpack"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    stats: dict[str, Counter] = {}
    crashes: dict[str, Counter] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        seeds = ft.make_seeds(work / "seeds")
        cfg = settings(max_examples=args.examples, deadline=None, database=None, phases=[Phase.generate],
                       suppress_health_check=list(HealthCheck))

        def run(name: str, fn, path: Path, data: bytes, suffix: str) -> None:
            c = stats.setdefault(name, Counter())
            c["tried"] += 1
            try:
                c[ft.run_target(fn, path)] += 1
            except ft.Crash as exc:
                c["crashed"] += 1
                msg = str(exc).splitlines()[0][:200]
                crashes.setdefault(name, Counter())[msg] += 1
                args.out.mkdir(parents=True, exist_ok=True)
                n = c["crashed"]
                (args.out / f"{name}-{n:05d}{suffix}").write_bytes(data)
                (args.out / f"{name}-{n:05d}.txt").write_text(msg + "\n")

        if "gguf" in args.targets:
            @cfg
            @given(plan=ft.gguf_plans())
            def fuzz_gguf(plan: list) -> None:
                data = ft.mutate_gguf(seeds.gguf, seeds.gguf_fields, plan)
                path = work / "m.gguf"
                path.write_bytes(data)
                for name, fn in ft.GGUF_TARGETS.items():
                    run(name, fn, path, data, ".gguf")

            t0 = time.perf_counter()
            fuzz_gguf()
            print(f"gguf targets: {time.perf_counter() - t0:.0f} s")
        if "unpack" in args.targets:
            (work / "u").mkdir()

            @cfg
            @given(plan=ft.pack_plans())
            def fuzz_unpack(plan: tuple) -> None:
                data = ft.mutate_pack(seeds.pack, seeds.pack_fields, *plan)
                path = work / "u" / "m.pack"
                path.write_bytes(data)
                run("unpack", ft.target_unpack, path, data, ".pack")

            t0 = time.perf_counter()
            fuzz_unpack()
            print(f"unpack target: {time.perf_counter() - t0:.0f} s")
    print("\n| target | inputs tried | accepted | rejected (DsnotError) | crashed |")
    print("|---|---|---|---|---|")
    for name, c in stats.items():
        print(f"| {name} | {c['tried']} | {c['accepted']} | {c['rejected']} | {c['crashed']} |")
    for name, msgs in crashes.items():
        print(f"\n{name} crashes (reproducers in {args.out}):")
        for msg, k in msgs.most_common():
            print(f"  {k:6d}  {msg}")
    return 1 if crashes else 0


if __name__ == "__main__":
    raise SystemExit(main())
