"""The perplexity protocols (algorithms.md section 5), named once.

``paper``: every position of non-overlapping chunks (Wanda/SparseGPT/DSnoT's WikiText-2 numbers).
``llamacpp``: llama-perplexity's, the second half of each chunk scored, BOS first.
Configs hold the plain string value; :func:`parse_protocol` is the one check.
"""

from __future__ import annotations

from enum import Enum

from dsnot_deploy.errors import UserInputError


class Protocol(str, Enum):
    PAPER = "paper"
    LLAMACPP = "llamacpp"


PAPER = Protocol.PAPER.value
LLAMACPP = Protocol.LLAMACPP.value
PROTOCOLS: tuple[str, ...] = tuple(p.value for p in Protocol)


def parse_protocol(value: str, option: str = "--protocol") -> str:
    """``value`` as a protocol name; UserInputError naming ``option`` and the choices otherwise."""
    try:
        return Protocol(value).value
    except ValueError:
        raise UserInputError(f"expected {option} in {PROTOCOLS}, found {value!r}") from None
