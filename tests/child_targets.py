"""Child-process targets for tests of ``llamacpp_child`` (a light module: the child imports it to find them)."""

from __future__ import annotations

from dsnot_deploy.errors import UserInputError


def crash_while_decoding(reporter, path: str) -> None:  # type: ignore[no-untyped-def]
    reporter.phase("decoding", path, "Q4_0")  # with DSNOT_LLAMACPP_FAULT=segv: a real SIGSEGV here


def raise_user_error(reporter, message: str) -> None:  # type: ignore[no-untyped-def]
    raise UserInputError(message)
