#!/usr/bin/env python
"""Does this machine's C++ compiler drop the AMX tile configuration before ``ldtilecfg``? (issue 12)

Compiles a 10-line probe written for this check (no llama.cpp code): a 64-byte tile configuration
on the stack, zero-initialised, palette 1, eight tiles of 16 rows x 64 bytes, then
``_tile_loadconfig(&cfg)``, the pattern of ggml's AMX kernels. It needs no AMX hardware: it only
reads the generated code. If the optimiser treats the ``ldtilecfg`` operand as 8 bytes (GCC's
``amxtileintrin.h`` asm constraint is ``"m" (*(const void **)P)``), the stores of the tile sizes
disappear and ``ldtilecfg`` loads a configuration without tiles: the first tile instruction faults.

Prints, per optimisation level, whether the tile-size stores (the constants 16 and 64) survive.
Example: ``python scripts/check_amx_codegen.py --compiler g++``
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

PROBE = r"""
#include <immintrin.h>
#include <cstdint>
struct probe_cfg { uint8_t palette; uint8_t start_row; uint8_t reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; };
void probe_configure() {
    alignas(64) probe_cfg cfg = {};
    cfg.palette = 1;
    for (int t = 0; t < 8; ++t) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}
"""


def disassemble(compiler: str, level: str, workdir: Path) -> str:
    source = workdir / "probe.cpp"
    source.write_text(PROBE)
    obj = workdir / f"probe-{level}.o"
    subprocess.run([compiler, f"-{level}", "-mamx-tile", "-c", str(source), "-o", str(obj)], check=True)
    return subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(obj)], check=True, capture_output=True,
                          text=True).stdout


def sizes_stored(asm: str) -> bool:
    """True when the code before ldtilecfg writes the tile sizes: immediates 0x10 (rows) and 0x40 (colsb)
    as bytes/words, or a vector constant that holds them (a load from .rodata)."""
    body = asm.split("ldtilecfg")[0]
    stores_rows = re.search(r"\$0x10,", body) is not None
    stores_cols = re.search(r"\$0x40,", body) is not None
    vector_constant = re.search(r"vmovdq\w*\s+0x0\(%rip\)|movdqa\s+0x0\(%rip\)", body) is not None
    return (stores_rows and stores_cols) or vector_constant


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiler", default="g++")
    args = parser.parse_args()
    version = subprocess.run([args.compiler, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    print(f"compiler: {version}")
    with tempfile.TemporaryDirectory() as tmp:
        for level in ("O0", "O1", "O2", "O3"):
            asm = disassemble(args.compiler, level, Path(tmp))
            kept = sizes_stored(asm)
            print(f"-{level}: tile sizes {'stored' if kept else 'DROPPED'} before ldtilecfg")


if __name__ == "__main__":
    main()
