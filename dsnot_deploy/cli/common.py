"""Pieces shared by every command's argument parser: exit codes, the parser class, logging flags."""

from __future__ import annotations

import argparse
from typing import Any

EXIT_OK, EXIT_FAIL, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors are one line and exit 2, like every other bad input."""

    def error(self, message: str) -> None:
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


def add_logging_options(p: argparse.ArgumentParser) -> None:
    """`--quiet` and `--debug`, which every command must have (main() reads them)."""
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    p.add_argument("--debug", action="store_true", help="debug logging and full tracebacks")


def progress_for(args: argparse.Namespace) -> Any:
    """The progress callback every command passes down: terminal bars on stderr, none with --quiet."""
    from dsnot_deploy.progress import terminal_bars

    return False if args.quiet else terminal_bars
