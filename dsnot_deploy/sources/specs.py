"""Model specs: an alias of an offline package (``aliases.MODEL_ALIASES``), a ``.gguf`` file, a local
Hugging Face checkpoint directory or a Hub id (``org/name``), resolved to a :class:`ModelSource`
without loading anything (an alias of a chunked file may first join its chunks into the cache)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.sources.aliases import MODEL_ALIASES

# `org/name`: Hub ids allow letters, digits, '-', '_' and '.'; neither part may start with '.'/'-'.
HUB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*/[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from.

    ``location`` is the directory holding the checkpoint (kinds ``local-dir``, ``gguf``,
    ``alias-gguf``; for GGUF kinds, the directory holding the file named by ``gguf_file``) or the
    Hub id (kind ``hub``).  ``spec`` is the string the user gave.
    """

    kind: str
    location: str
    spec: str
    gguf_file: str | None = None

    @property
    def path(self) -> Path | None:
        """The local file (GGUF kinds) or directory (``local-dir``); None for the Hub."""
        if self.kind == "hub":
            return None
        if self.gguf_file is not None:
            return Path(self.location) / self.gguf_file
        return Path(self.location)

    def describe(self) -> str:
        """One line for logs and messages, e.g. ``gguf:/models/x.gguf``."""
        where = self.location if self.kind == "hub" else str(self.path)
        if self.kind == "alias-gguf":
            return f"{self.spec} (alias of {where})"
        return f"{self.kind}:{where}"


def resolve_model_source(spec: str) -> ModelSource:
    """Classify ``spec`` as an alias, a GGUF file, a checkpoint directory or a Hub id."""
    if not isinstance(spec, str) or not spec.strip():
        raise UserInputError(f"expected a model alias, .gguf file, checkpoint directory or Hub id; found {spec!r}")
    spec = spec.strip()

    alias = MODEL_ALIASES.get(spec)
    if alias is not None:
        gguf_path = alias.resolve(spec)
        return ModelSource(kind="alias-gguf", location=str(gguf_path.parent), spec=spec, gguf_file=gguf_path.name)

    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"not a checkpoint: no config.json in {path}")
        return ModelSource(kind="local-dir", location=str(path.resolve()), spec=spec)
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            resolved = path.resolve()
            return ModelSource(kind="gguf", location=str(resolved.parent), spec=spec, gguf_file=resolved.name)
        raise UserInputError(
            f"expected a .gguf file or a checkpoint directory containing config.json; found the file {path}"
        )
    if path.suffix.lower() == ".gguf":
        raise UserInputError(f"GGUF file not found: {path}")
    if HUB_ID_RE.match(spec) and not spec.startswith(("./", "../", "/", "~")):
        return ModelSource(kind="hub", location=spec, spec=spec)
    raise UserInputError(
        f"expected a model alias ({', '.join(sorted(MODEL_ALIASES))}), a .gguf file, a checkpoint "
        f"directory or a Hugging Face id like org/name; found {spec!r}, which is none of these "
        f"(no such file or directory)"
    )
