"""Command-line interface: the entry point and the command registry. Each command lives in its own
module of this package (`register(subparsers) -> {name: handler}`); option groups shared by several
commands are in `options`. The CLI is the only place that parses strings and sets up logging.

Exit codes: 0 success, 2 bad input (one clear line, no traceback unless --debug), 1 a failed gate,
a llama.cpp crash (one line) or an internal error, 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from dsnot_deploy import __version__
from dsnot_deploy.cli.common import (
    EXIT_BAD_INPUT,
    EXIT_FAIL,
    EXIT_INTERRUPTED,
    Parser,
)
from dsnot_deploy.errors import DsnotError

log = logging.getLogger("dsnot_deploy")

# Commands defined in their own modules: each has `register(subparsers) -> {name: handler}`.
COMMAND_MODULES = (
    "dsnot_deploy.cli.refine",
    "dsnot_deploy.cli.eval",
    "dsnot_deploy.cli.export",
    "dsnot_deploy.cli.validate",
    "dsnot_deploy.cli.refine_and_export",
    "dsnot_deploy.cli.pack",
    "dsnot_deploy.cli.frontier",
)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="dsnot-deploy", description="Make a decoder LLM sparse without training and ship it.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    for module_name in COMMAND_MODULES:
        COMMANDS.update(importlib.import_module(module_name).register(sub))
    return parser


def _setup_logging(args: argparse.Namespace) -> None:
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if args.quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
    for noisy in ("transformers", "datasets", "urllib3", "httpx", "huggingface_hub", "filelock"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args)
    try:
        return COMMANDS[args.command](args)
    except DsnotError as exc:
        if args.debug:
            log.exception("failed")
        print(f"dsnot-deploy {args.command}: error: {exc}", file=sys.stderr)
        return int(getattr(exc, "exit_code", EXIT_BAD_INPUT))
    except KeyboardInterrupt:
        print(f"dsnot-deploy {args.command}: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # last resort: one line unless --debug
        if args.debug:
            raise
        print(f"dsnot-deploy {args.command}: internal error: {type(exc).__name__}: {exc} "
              "(rerun with --debug for the traceback)", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
