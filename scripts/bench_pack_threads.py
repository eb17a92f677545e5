"""Benchmark of `pack --threads`: pack MB/s with every core vs one core, in one run, on one GGUF.

Packs the GGUF at the default zstd levels with threads=1 and threads=all cores (best of --repeat
runs each, alternating so that a changing background load hits both alike), checks that the two
packs are byte-identical, times `unpack` once (it does not depend on --threads), and measures the
load of *other* processes during each run (busy CPU time of the machine from /proc/stat minus this
process's own CPU time, per second of wall time), since it depresses the ratio. Target (issue 16):
ratio >= 0.7 x the core count.

    dsnot-deploy export smollm2-135m /tmp/bench_pack_threads/smollm2-135m-Q8_0.gguf --type Q8_0
    python scripts/bench_pack_threads.py /tmp/bench_pack_threads/smollm2-135m-Q8_0.gguf
    # writes docs/bench_pack_threads.md and docs/bench_pack_threads.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from converters.pack_threads import available_cores  # noqa: E402
from converters.sparse_pack import pack_gguf, unpack  # noqa: E402

MB = 1e6


@dataclass(frozen=True)
class Run:
    threads: int
    seconds: float
    mb_per_s: float
    own_cores: float  # CPU seconds of this process per wall second
    other_cores: float  # CPU seconds of every other process per wall second
    mb_per_cpu_s: float  # MB packed per CPU second of this process (parallel overhead shows here)
    sha256: str
    pack_bytes: int


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot (all cores), from /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _autogroup() -> str:
    try:
        return "on" if Path("/proc/sys/kernel/sched_autogroup_enabled").read_text().strip() == "1" else "off"
    except OSError:
        return "unknown"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            h.update(block)
    return h.hexdigest()


def time_pack(src: Path, dst: Path, threads: int) -> Run:
    busy0, own0, t0 = _busy_seconds(), _own_seconds(), time.perf_counter()
    pack_gguf(src, dst, force=True, threads=threads)
    wall = time.perf_counter() - t0
    own = _own_seconds() - own0
    other = max(0.0, _busy_seconds() - busy0 - own)
    size = src.stat().st_size / MB
    return Run(threads, wall, size / wall, own / wall, other / wall, size / max(own, 1e-9), _sha256(dst),
               dst.stat().st_size)


def time_unpack(pk: Path, out: Path) -> dict:
    t0 = time.perf_counter()
    unpack(pk, out, force=True)
    wall = time.perf_counter() - t0
    return {"seconds": wall, "mb_per_s": out.stat().st_size / MB / wall}


def report(result: dict) -> str:
    one, all_ = result["one_core"], result["all_cores"]
    n = result["cores"]
    lines = [
        "# `pack --threads`: all cores vs one core",
        "",
        f"`python scripts/bench_pack_threads.py {result['gguf_name']}` ({result['date']}, {result['machine']}).",
        "",
        f"Input: `{result['gguf_name']}`, {result['gguf_bytes'] / MB:.1f} MB; default zstd levels; "
        f"best of {result['repeat']} run(s) per setting, alternating.",
        "",
        "| threads | seconds | MB/s | cores used by pack | MB per CPU second of pack | cores used by other processes |",
        "|---|---|---|---|---|---|",
    ]
    for r in (one, all_):
        lines.append(f"| {r['threads']} | {r['seconds']:.1f} | {r['mb_per_s']:.2f} | {r['own_cores']:.2f} | "
                     f"{r['mb_per_cpu_s']:.2f} | {r['other_cores']:.2f} |")
    verdict = "met" if result["ratio"] >= result["target"] else "missed"
    lines += [
        "",
        f"- Ratio all cores / one core: **{result['ratio']:.2f}x** on {n} cores; target 0.7 x {n} = "
        f"{result['target']:.2f}x: **{verdict}**.",
        f"- Packs byte-identical (sha256): **{'yes' if result['identical'] else 'NO'}** "
        f"(`{one['sha256'][:16]}...`, {one['pack_bytes']:,} bytes).",
        f"- `unpack` of the same pack: {result['unpack']['mb_per_s']:.1f} MB/s "
        f"(unchanged code path: decoding does not use --threads).",
        f"- Background load: other processes used {one['other_cores']:.2f} cores during the one-core run and "
        f"{all_['other_cores']:.2f} during the all-cores run (load average before: "
        f"{', '.join(f'{x:.2f}' for x in result['loadavg_before'])}; the kernel's per-session fair "
        f"scheduling (autogroup) is {result['autogroup']}).",
    ]
    lines += [f"- {note}" for note in result.get("notes", [])]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", type=Path, help="the GGUF to pack")
    ap.add_argument("--threads", type=int, default=None, help="'all cores' (default: every available core)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting, best kept (default 1)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the packs go (default: a temporary dir)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_pack_threads",
                    help="writes OUT.md and OUT.json")
    ap.add_argument("--note", action="append", default=[], help="a line added to the report (repeatable)")
    args = ap.parse_args()
    if not args.gguf.is_file():
        print(f"expected a GGUF file, found no file at {args.gguf} (see the docstring for how to build one)",
              file=sys.stderr)
        return 2
    cores = args.threads or available_cores()
    if cores < 1 or args.repeat < 1:
        print("expected --threads >= 1 and --repeat >= 1", file=sys.stderr)
        return 2
    loadavg = list(os.getloadavg())
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        best: dict[int, Run] = {}
        for i in range(args.repeat):
            for threads in (1, cores):
                run = time_pack(args.gguf, work / f"t{threads}.pack", threads)
                print(f"run {i + 1}: {threads} thread(s): {run.seconds:.1f} s, {run.mb_per_s:.2f} MB/s, "
                      f"pack {run.own_cores:.2f} cores, others {run.other_cores:.2f} cores", flush=True)
                if threads not in best or run.seconds < best[threads].seconds:
                    best[threads] = run
        unpacked = time_unpack(work / f"t{cores}.pack", work / "restored.gguf")
        if _sha256(work / "restored.gguf") != _sha256(args.gguf):
            print("unpack did not restore the GGUF", file=sys.stderr)
            return 1
    one, all_ = best[1], best[cores]
    result = {
        "gguf_name": args.gguf.name, "gguf_bytes": args.gguf.stat().st_size, "cores": cores,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}",
        "date": time.strftime("%Y-%m-%d"), "repeat": args.repeat, "loadavg_before": loadavg,
        "one_core": asdict(one), "all_cores": asdict(all_), "ratio": one.seconds / all_.seconds,
        "target": 0.7 * cores, "identical": one.sha256 == all_.sha256, "unpack": unpacked, "notes": args.note,
        "autogroup": _autogroup(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1) + "\n"), (".md", report(result))):
        path = args.out.with_suffix(suffix)
        tmp_path = path.with_name(f".{path.name}.tmp")
        tmp_path.write_text(text)
        tmp_path.replace(path)
    print(report(result))
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
