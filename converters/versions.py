"""Versions of the runtimes an export report records."""

from __future__ import annotations

import platform


def runtime_versions() -> dict[str, str]:
    versions = {"python": platform.python_version(), "gguf": dist_version("gguf")}
    versions["llama-cpp-python"] = dist_version("llama-cpp-python")
    return versions


def dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"
