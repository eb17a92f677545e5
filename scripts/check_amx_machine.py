#!/usr/bin/env python
"""Issue 12's proof on a CPU with AMX: the files of scripts/bench_llamacpp_loader.py validated here with
the loader's default (extra buffer types off) and with llama.cpp's own (on), and the perplexities set
against the reference machine's (`--reference`, the JSON that bench wrote on a CPU without AMX).

Per type: the sparse and the dense file's perplexity with the buffers off, their relative difference
to the reference machine's off figures (target <= 1e-4 for the dense file, whose bytes do not depend on
torch; the sparse checkpoint, Wanda with no update, is refined again here, so a near-tie of its mask
may flip), and what happened with the buffers on (a perplexity, or the one-line crash the child
process turned it into).

    python scripts/check_amx_machine.py --types F16 Q8_0 Q4_0 Q6_K SPARSE_Q4

Writes docs/bench_llamacpp_amx.{md,json}.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp_loader import (  # noqa: E402
    ROOT,
    build_parser,
    machine_facts,
    measure,
    sparse_checkpoint,
)
from bench_validate import exported  # noqa: E402

from dsnot_deploy.errors import DsnotError  # noqa: E402

log = logging.getLogger("check_amx_machine")


def main() -> None:
    parser = build_parser()
    parser.description = __doc__
    parser.add_argument("--reference", type=Path, default=ROOT / "docs" / "bench_llamacpp_loader.json",
                        help="the JSON scripts/bench_llamacpp_loader.py wrote on the reference machine")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    ref_payload = json.loads(args.reference.read_text())
    reference = {r["type"]: r for r in ref_payload["rows"]}
    ckpt = sparse_checkpoint(args)
    rows = []
    for qtype in args.types:
        sparse = exported(ckpt, qtype)
        off = measure(args, sparse, "off")
        try:
            on = measure(args, sparse, "on")
            on_result = f"sparse {on['sparse_ppl']:.4f}, dense {on['dense_ppl']:.4f}"
        except DsnotError as err:
            on_result = f"error: {err}"
        ref = reference.get(qtype, {})
        row = {"type": qtype, "sparse_ppl_off": off["sparse_ppl"], "dense_ppl_off": off["dense_ppl"],
               "ref_sparse_ppl_off": ref.get("sparse_ppl_off"), "ref_dense_ppl_off": ref.get("dense_ppl_off"),
               "on": on_result}
        for kind in ("sparse", "dense"):
            r = row[f"ref_{kind}_ppl_off"]
            row[f"{kind}_rel_diff"] = abs(row[f"{kind}_ppl_off"] / r - 1) if r else None
        log.info("%s: %s", qtype, row)
        rows.append(row)
    machine = machine_facts()
    (args.out / "bench_llamacpp_amx.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=2) + "\n")
    fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
    ref = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    lines = ["# llama.cpp on a CPU with AMX (scripts/check_amx_machine.py, issue 12)", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores; flags {', '.join(machine['flags'])}; AMX: "
             f"{'yes' if machine['cpu_amx'] else 'no'}; {machine['llamacpp']} built with "
             f"{', '.join(machine['llama_cpp_build'])}. Reference: {args.reference.name} (its machine: "
             f"{ref_payload['machine']['cpu']}). Same files and protocol as that "
             f"benchmark ({args.chunks} x {args.ctx} tokens of {Path(args.text).name}).", "",
             "| type | sparse ppl off | reference | rel. diff | dense ppl off | reference | rel. diff | buffers on |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['type']} | {r['sparse_ppl_off']:.4f} | {ref(r['ref_sparse_ppl_off'])} | "
                     f"{fmt(r['sparse_rel_diff'])} | {r['dense_ppl_off']:.4f} | {ref(r['ref_dense_ppl_off'])} | "
                     f"{fmt(r['dense_rel_diff'])} | {r['on']} |")
    (args.out / "bench_llamacpp_amx.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
