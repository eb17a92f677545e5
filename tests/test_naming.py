"""general.* naming keys: carried from the model source into the manifest and the GGUF (issue 13)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

pytest.importorskip("llama_cpp")

from converters.gguf_export import ExportConfig, export_gguf  # noqa: E402
from dsnot_deploy.cli import main  # noqa: E402
from dsnot_deploy.sources.naming import readme_license, source_naming  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

TEXT = " ".join(f"Line {i} of a calibration text about foxes, dogs and numbers like {i * 7}." for i in range(200))


def _general(path: Path) -> dict[str, str]:
    reader = gguf.GGUFReader(path)
    return {k.removeprefix("general."): f.contents() for k, f in reader.fields.items()
            if k.startswith("general.") and k not in ("general.architecture", "general.file_type",
                                                       "general.quantization_version", "general.alignment")}


@pytest.fixture()
def named(tmp_path: Path) -> Path:
    """A checkpoint that came from the Hub id tiny-org/Tiny-Llama-Chat with an Apache model card."""
    ckpt = save_tiny_checkpoint(tmp_path / "download", arch="llama")
    config = json.loads((ckpt / "config.json").read_text())
    config["_name_or_path"] = "tiny-org/Tiny-Llama-Chat"
    (ckpt / "config.json").write_text(json.dumps(config))
    (ckpt / "README.md").write_text("---\nlicense: apache-2.0\ntags: [test]\n---\n# Tiny\n")
    return ckpt


def test_readme_license_reads_front_matter_only(tmp_path: Path) -> None:
    card = tmp_path / "README.md"
    card.write_text("---\nlibrary_name: x\nlicense: 'mit'\n---\nlicense: not-this-one\n")
    assert readme_license(card) == "mit"
    card.write_text("# no front matter\nlicense: gpl\n")
    assert readme_license(card) is None
    assert readme_license(tmp_path / "missing.md") is None


def test_refine_then_export_names_the_source_model(named: Path, tmp_path: Path) -> None:
    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "sparse-out"
    assert main(["refine", str(named), str(out), "--calib", str(text), "--nsamples", "2", "--seqlen", "32",
                 "--refine", "none", "-q"]) == 0
    manifest = json.loads((out / "sparsity.json").read_text())
    assert manifest["model"]["naming"] == {"name": "Tiny-Llama-Chat", "organization": "tiny-org",
                                           "license": "apache-2.0"}
    gguf_path = tmp_path / "sparse.gguf"
    assert main(["export", str(out), str(gguf_path), "-q"]) == 0
    general = _general(gguf_path)
    assert general["name"] == "Tiny-Llama-Chat" and general["organization"] == "tiny-org"
    assert general["license"] == "apache-2.0" and general["size_label"].endswith("K")  # ~100k parameters
    assert general["name"] != "sparse-out"  # not the folder the checkpoint happens to sit in


def test_a_gguf_source_carries_its_own_naming(named: Path, tmp_path: Path) -> None:
    first = tmp_path / "first.gguf"
    export_gguf(named, first, ExportConfig(qtype="F32", progress=False,
                                           naming=(("name", "Tiny Llama Chat"), ("basename", "tiny-llama"),
                                                   ("finetune", "chat"), ("size_label", "9M"))))
    naming = source_naming(str(first))
    assert naming == {"name": "Tiny Llama Chat", "basename": "tiny-llama", "finetune": "chat", "size_label": "9M"}
    assert source_naming(str(tmp_path / "no-such-model")) == {}
