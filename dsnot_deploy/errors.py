"""One exception base for the package; messages say what was expected and what was found."""

from __future__ import annotations


class DsnotError(Exception):
    """Base class of every error this package raises on purpose."""


class UserInputError(DsnotError):
    """Bad input from the user (arguments, files, text): the CLI exits with code 2."""


class UnsupportedModelError(UserInputError):
    """The model's architecture does not have the structure the engine needs."""
