"""What a model is called: the ``general.*`` naming keys a GGUF carries (name, basename, finetune,
organization, size label, license, version), taken from the model's source the way llama.cpp's
converter takes them from a model's config and card.

- a GGUF file or an alias: its own ``general.*`` keys;
- a checkpoint directory: ``_name_or_path`` of config.json when it is a Hub id (``org/name``), else
  the folder name; the license from README.md's front matter (``license: apache-2.0``);
- a Hub id: ``org/name``.

The size label is left to the exporter, which counts the parameters it writes.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsnot_deploy.sources.specs import HUB_ID_RE, ModelSource, resolve_model_source

NAMING_KEYS = ("name", "basename", "finetune", "organization", "size_label", "license", "version")


def source_naming(spec: str) -> dict[str, str]:
    """The naming keys known for model ``spec`` (only those found; never raises for a missing card)."""
    try:
        source = resolve_model_source(spec)
    except Exception:  # noqa: BLE001 - naming is best effort; loading reports a bad spec clearly
        return {}
    return naming_of(source)


def naming_of(source: ModelSource) -> dict[str, str]:
    if source.kind in ("gguf", "alias-gguf") and source.path is not None:
        return _gguf_naming(source.path)
    if source.kind == "local-dir":
        return _directory_naming(Path(source.location))
    return _hub_naming(str(source.location))


def _gguf_naming(path: Path) -> dict[str, str]:
    from converters.gguf_info import read_gguf_info

    metadata = read_gguf_info(path).metadata
    return {k: str(metadata[f"general.{k}"]) for k in NAMING_KEYS if metadata.get(f"general.{k}") not in (None, "")}


def _hub_naming(hub_id: str) -> dict[str, str]:
    organization, _, name = hub_id.partition("/")
    return {"name": name, "organization": organization} if name else {"name": hub_id}


def _directory_naming(directory: Path) -> dict[str, str]:
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    origin = str(config.get("_name_or_path") or "")
    naming = _hub_naming(origin) if HUB_ID_RE.match(origin) else {"name": directory.resolve().name}
    license_name = readme_license(directory / "README.md")
    if license_name:
        naming["license"] = license_name
    return naming


def readme_license(readme: Path) -> str | None:
    """``license:`` of a model card's YAML front matter (the block between the first two ``---``)."""
    try:
        text = readme.read_text(errors="replace")
    except OSError:
        return None
    if not text.startswith("---"):
        return None
    front = text[3:].split("\n---", 1)[0]
    for line in front.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "license" and value.strip():
            return value.strip().strip("'\"")
    return None
