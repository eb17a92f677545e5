"""`pack`, `unpack` and `inspect`: compact sparse packs of GGUF files and legacy bitmask checkpoints.

The work is in `converters/` (sparse_pack, bitmask_checkpoint, pack_inspect); this module only
parses arguments and prints one summary line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from dsnot_deploy.cli.common import EXIT_OK, add_logging_options, progress_for
from dsnot_deploy.errors import UserInputError

PACK_FORMATS = ("gguf-pack", "sparse-bitmask", "sparse-24-bitmask")


def register(sub: argparse._SubParsersAction) -> dict[str, Callable[[argparse.Namespace], int]]:
    p = sub.add_parser(
        "pack", help="compact sparse pack of a GGUF (or a legacy sparse-bitmask checkpoint)",
        description="Pack a GGUF into a compact sparse file that `unpack` restores byte for byte; or, with "
                    "--format sparse-bitmask / sparse-24-bitmask, write a checkpoint in the legacy "
                    "compressed-tensors layout. Format: docs/pack-format.md.")
    p.add_argument("input", type=Path, help="GGUF file (gguf-pack) or checkpoint directory (bitmask formats)")
    p.add_argument("output", type=Path, help="pack file (gguf-pack) or output directory (bitmask formats)")
    p.add_argument("--format", default="gguf-pack", choices=PACK_FORMATS,
                   help="gguf-pack (default): byte-identical GGUF pack; sparse-bitmask / sparse-24-bitmask: "
                        "legacy compressed-tensors safetensors layout")
    p.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--threads", type=int, default=None,
                   help="tensors compressed at once (gguf-pack; default: every core this process may use); "
                        "the pack's bytes do not depend on it")
    lv = p.add_argument_group("zstd levels (gguf-pack; unpack speed does not depend on them)")
    lv.add_argument("--fast", action="store_true",
                    help="level 3 for every tensor stream: packs about 40x faster, about 5%% larger")
    for name, default in (("meta", 19), ("raw", 19), ("side", 19), ("mask", 3), ("values", 19)):
        lv.add_argument(f"--{name}-level", type=int, default=None, help=f"level of {name} streams (default {default})")
    add_logging_options(p)

    u = sub.add_parser("unpack", help="restore the GGUF from a pack (or a dense checkpoint from a bitmask one)",
                       description="Restore the exact original GGUF from a pack (every checksum verified), or a "
                                   "dense-with-zeros checkpoint from a sparse-bitmask / sparse-24-bitmask one.")
    u.add_argument("input", type=Path, help="pack file or bitmask checkpoint directory")
    u.add_argument("output", type=Path, help="restored GGUF file or checkpoint directory")
    u.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    add_logging_options(u)

    i = sub.add_parser("inspect", help="show what a GGUF or a pack holds",
                       description="Tensors, types, sparsity per tensor, detected pattern (unstructured / N:M), "
                                   "metadata; for a pack also the size breakdown.")
    i.add_argument("file", type=Path, help="GGUF file or pack")
    i.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")
    i.add_argument("--no-metadata", action="store_true", help="do not list the GGUF metadata")
    add_logging_options(i)
    return {"pack": _cmd_pack, "unpack": _cmd_unpack, "inspect": _cmd_inspect}


def _cmd_pack(args: argparse.Namespace) -> int:
    from converters.pack_threads import resolve_threads

    resolve_threads(args.threads)  # a bad --threads is rejected before any work, whatever the format
    if args.format != "gguf-pack":
        from converters.bitmask_checkpoint import pack_bitmask_checkpoint

        info = pack_bitmask_checkpoint(args.input, args.output, structure=args.format, force=args.force,
                                       progress=progress_for(args))
        print(f"wrote {args.output}: {args.format}, {info['compressed_tensors']} tensors compressed, "
              f"{info['bytes_before']:,} -> {info['bytes_after']:,} bytes of safetensors")
        return EXIT_OK
    from dataclasses import asdict

    from converters.pack_records import FAST_LEVELS, PackLevels
    from converters.sparse_pack import pack_gguf

    chosen = dict(FAST_LEVELS) if args.fast else asdict(PackLevels())
    for name in chosen:
        if getattr(args, f"{name}_level") is not None:
            chosen[name] = getattr(args, f"{name}_level")
    levels = PackLevels(**chosen)
    s = pack_gguf(args.input, args.output, force=args.force, levels=levels, progress=progress_for(args),
                  threads=args.threads)
    kinds: dict[str, int] = {}
    for d in s.records:
        if d["k"] == "tensor":
            key = "raw" if d.get("enc") == "raw" else ("N:M" if d["mask"] == "nm" else d["mask"])
            kinds[key] = kinds.get(key, 0) + 1
    parts = ", ".join(f"{v} {k}" for k, v in sorted(kinds.items()))
    print(f"wrote {args.output}: {s.pack_size:,} bytes from {s.original_size:,} "
          f"({s.pack_size / max(s.original_size, 1):.3f}x); tensors: {parts or 'none'}; "
          f"{s.seconds:.1f} s, {s.mb_per_s:.1f} MB/s on {s.threads} thread{'s' if s.threads > 1 else ''}")
    return EXIT_OK


def _cmd_unpack(args: argparse.Namespace) -> int:
    if args.input.is_dir():
        from converters.bitmask_checkpoint import unpack_bitmask_checkpoint

        n = unpack_bitmask_checkpoint(args.input, args.output, force=args.force, progress=progress_for(args))
        print(f"wrote {args.output}: dense checkpoint, {n} tensors decompressed")
        return EXIT_OK
    from converters.sparse_pack import is_pack, unpack

    if args.input.is_file() and not is_pack(args.input):
        raise UserInputError(f"{args.input}: expected a dsnot-deploy pack or a bitmask checkpoint directory")
    h = unpack(args.input, args.output, force=args.force, progress=progress_for(args))
    print(f"wrote {args.output}: {h.original_size:,} bytes, sha256 {h.sha256} verified")
    return EXIT_OK


def _cmd_inspect(args: argparse.Namespace) -> int:
    from converters.pack_inspect import format_report, inspect_file

    if not args.file.is_file():
        raise UserInputError(f"expected a GGUF file or a pack, found no file at {args.file}")
    info = inspect_file(args.file)
    print(format_report(info, metadata=not args.no_metadata))
    if args.json is not None:
        from dsnot_deploy.atomic import atomic_write_bytes

        atomic_write_bytes(args.json, json.dumps(info, indent=1, default=str).encode())
    return EXIT_OK
