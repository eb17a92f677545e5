"""The product's files stay the same bytes across refactors (issue 13).

One run of the whole pipeline on a tiny Llama with fixed seeds: `refine-and-export` (magnitude 50%,
no refinement and no weight update: the mask and the kept weights depend on the dense weights alone,
so the bytes do not depend on the CPU's floating-point kernels; with the default ADMM update they
did, and an Intel CPU with AMX wrote other checkpoint bytes than the AMD EPYC that recorded them),
F16 and Q8_0 GGUFs, a pack of each, and the reports. The sha256 of every
file, and of each JSON report with its machine-dependent fields removed (timings, paths, versions,
and the measured float metrics of llama.cpp and torch), must equal what the code produced before the
reorganisation (tests/golden_outputs.json). Regenerate it only for an intended change of output:
``DSNOT_GOLDEN_WRITE=1 python -m pytest tests/test_golden_outputs.py`` and say why in the commit.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("llama_cpp")

from dsnot_deploy.cli import main  # noqa: E402
from tests.helpers_tokenizer import make_tiny_tokenizer  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

GOLDEN = Path(__file__).with_name("golden_outputs.json")
TEXT = " ".join(f"Line {i} says the quick brown fox jumps over the lazy dog number {i % 7}." for i in range(300))
# keys whose values depend on the machine, the clock or the tmp folder, not on the code's output
_VOLATILE = ("seconds", "time", "tokens_per_second", "per_second", "mb_s", "date", "path", "versions", "version",
             "cache", "rss", "memory", "threads", "host", "runtime", "dir", "checkpoint", "cpu", "llamacpp")
# measured floats (llama.cpp / torch forward passes): reproducible on one machine, not across CPUs
_MEASURED = ("ppl", "kld", "nll", "top1", "error", "loss", "relative_difference", "margin", "value", "mean",
             "median", "p90", "p99", "max")


def _normalise(value: Any, key: str = "", root: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _normalise(v, k, root) for k, v in sorted(value.items())
                if not any(word in k.lower() for word in _VOLATILE)}
    if isinstance(value, list):
        return [_normalise(v, key, root) for v in value]
    if isinstance(value, str) and root:
        return value.replace(root, "<root>")
    if isinstance(value, float):
        return None if any(word in key.lower() for word in _MEASURED) else float(f"{value:.6g}")
    return value


def _digest(path: Path, root: Path) -> str:
    if path.suffix == ".json":
        data = _normalise(json.loads(path.read_text()), root=str(root.resolve()))
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _produce() -> dict[str, str]:
    """Run in the current folder with relative paths (the files record the sources they came from)."""
    root = Path(".")
    model = save_tiny_checkpoint(root / "tiny-llama", arch="llama", seed=3, tokenizer=make_tiny_tokenizer(),
                                 vocab_size=320, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    text = root / "text.txt"
    text.write_text(TEXT)
    out: dict[str, str] = {}
    for qtype in ("F16", "Q8_0"):
        gguf = root / f"sparse-{qtype}.gguf"
        ckpt = root / f"ckpt-{qtype}"
        code = main(["refine-and-export", str(model), str(gguf), "--type", qtype, "--method", "magnitude",
                     "--refine", "none", "--update", "none", "--sparsity", "0.5", "--calib", str(text),
                     "--nsamples", "4", "--seqlen", "32", "--seed", "0", "--text", str(text), "--ctx", "32", "--max-chunks", "2", "--threads", "1",
                     "--keep-checkpoint", str(ckpt), "--cache-dir", str(root / "cache"), "-q"])
        assert code == 0
        pack = root / f"sparse-{qtype}.pack"
        assert main(["pack", str(gguf), str(pack), "--fast", "-q"]) == 0
        files = [gguf, pack, Path(str(gguf) + ".export.json"), gguf.with_name(gguf.stem + ".report.json"),
                 ckpt / "model.safetensors", ckpt / "config.json", ckpt / "tokenizer.json", ckpt / "sparsity.json"]
        for path in files:
            out[f"{qtype}/{path.as_posix().replace(f'-{qtype}', '')}"] = _digest(path, Path.cwd())
    return out


def test_pipeline_outputs_are_the_recorded_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    got = _produce()
    if os.environ.get("DSNOT_GOLDEN_WRITE") == "1":
        GOLDEN.write_text(json.dumps(got, indent=2, sort_keys=True) + "\n")
    expected = json.loads(GOLDEN.read_text())
    changed = sorted(k for k in expected if got.get(k) != expected[k])
    assert set(got) == set(expected) and not changed, f"outputs changed: {changed}"
