"""`validate --gpu-layers N` (and refine-and-export's): parsing, the value reaching llama.cpp's
constructor for both models, the report, and the error on a llama.cpp build without GPU offload.

No GPU here: the build's answer (`llama_supports_gpu_offload`) is patched either way, and the
llama.cpp child runs in-process so that the constructor can be observed (a CPU build given
n_gpu_layers runs on the CPU, so the numbers are real)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

llama_cpp = pytest.importorskip("llama_cpp")
gguf_export = pytest.importorskip("converters.gguf_export")

from converters import llamacpp_loader  # noqa: E402
from dsnot_deploy.cli import build_parser, main  # noqa: E402
from dsnot_deploy.errors import UserInputError  # noqa: E402
from dsnot_deploy.evaluation import llamacpp_child  # noqa: E402
from dsnot_deploy.evaluation.validate import ValidateConfig  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

TEXT = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(60))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu_layers")
    ckpt = save_tiny_checkpoint(root / "ckpt", arch="llama")
    out = root / "tiny.gguf"
    gguf_export.export_gguf(ckpt, out, gguf_export.ExportConfig(qtype="F32", progress=False))
    text = root / "text.txt"
    text.write_text(TEXT)
    return {"gguf": out, "text": text}


def _gpu_build(monkeypatch: pytest.MonkeyPatch, supported: bool) -> None:
    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: supported)


class _Reporter:
    """The child's reporter, in-process: messages go straight to run_isolated's on_message."""

    def __init__(self, on_message: Any) -> None:
        self._on_message = on_message

    def phase(self, *args: Any) -> None:
        pass

    def send(self, kind: str, *payload: Any) -> None:
        if self._on_message is not None:
            self._on_message((kind, *payload))


def _in_process(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Run the llama.cpp child in this process and record every llama_cpp.Llama construction's kwargs."""
    calls: list[dict[str, Any]] = []
    real = llama_cpp.Llama

    class Recording(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            calls.append(kwargs)
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(llama_cpp, "Llama", Recording)
    monkeypatch.setattr(llamacpp_child, "run_isolated",
                        lambda target, *args, on_message=None: target(_Reporter(on_message), *args))
    return calls


def _validate_argv(tiny: dict[str, Path], *extra: str) -> list[str]:
    return ["validate", str(tiny["gguf"]), "--dense", str(tiny["gguf"]), "--text", str(tiny["text"]),
            "--ctx", "32", "--max-chunks", "1", "--threads", "1", "-q", *extra]


def test_parsing_default_is_cpu_and_minus_one_means_all() -> None:
    p = build_parser()
    assert p.parse_args(["validate", "s.gguf", "--dense", "d"]).gpu_layers == 0
    assert p.parse_args(["validate", "s.gguf", "--dense", "d", "--gpu-layers", "-1"]).gpu_layers == -1
    assert p.parse_args(["validate", "s.gguf", "--dense", "d", "--gpu-layers", "20"]).gpu_layers == 20
    assert p.parse_args(["refine-and-export", "o.gguf"]).gpu_layers == 0
    assert p.parse_args(["refine-and-export", "o.gguf", "--gpu-layers", "-1"]).gpu_layers == -1
    with pytest.raises(SystemExit) as exc:
        main(["validate", "s.gguf", "--dense", "d", "--gpu-layers", "all"])
    assert exc.value.code == 2


def test_gpu_layers_reach_the_llama_constructor_of_both_models_and_the_report(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_build(monkeypatch, True)
    calls = _in_process(monkeypatch)
    report = tmp_path / "r.json"
    assert main(_validate_argv(tiny, "--gpu-layers", "-1", "--json", str(report))) == 0
    assert [c["n_gpu_layers"] for c in calls] == [-1, -1]  # sparse and dense
    data = json.loads(report.read_text())
    assert data["settings"]["gpu_layers"] == -1
    assert data["llamacpp_runtime"]["gpu_offload_supported"] is True


def test_cpu_default_passes_zero_and_is_recorded(tiny: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_build(monkeypatch, False)  # 0 layers never asks the build
    calls = _in_process(monkeypatch)
    report = tmp_path / "r.json"
    assert main(_validate_argv(tiny, "--json", str(report))) == 0
    assert [c["n_gpu_layers"] for c in calls] == [0, 0]
    assert json.loads(report.read_text())["settings"]["gpu_layers"] == 0


@pytest.mark.parametrize("layers", ["-1", "4"])
def test_a_build_without_gpu_offload_is_an_error_before_any_work(
        tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, layers: str) -> None:
    _gpu_build(monkeypatch, False)

    def never(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("llama.cpp must not run")

    monkeypatch.setattr(llamacpp_child, "run_isolated", never)
    report = tmp_path / "r.json"
    assert main(_validate_argv(tiny, "--gpu-layers", layers, "--json", str(report))) == 2
    err = capsys.readouterr().err
    assert f"--gpu-layers {layers}" in err and "without GPU offload" in err and "--gpu-layers 0" in err
    assert "DGGML_CUDA" in err and "Traceback" not in err
    assert not report.exists()


def test_refine_and_export_passes_gpu_layers_to_validation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dsnot_deploy import pipeline

    _gpu_build(monkeypatch, True)
    seen: list[Any] = []

    class Stop(Exception):
        pass

    def capture(config: Any) -> None:
        seen.append(config.validate)
        raise Stop

    monkeypatch.setattr(pipeline, "run_pipeline", capture)
    main(["refine-and-export", str(tmp_path / "o.gguf"), "--gpu-layers", "12", "-q"])  # stopped at the pipeline
    assert seen[0].gpu_layers == 12


def test_refine_and_export_fails_fast_on_a_cpu_only_build(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          capsys) -> None:
    from dsnot_deploy import pipeline

    _gpu_build(monkeypatch, False)
    monkeypatch.setattr(pipeline, "run_pipeline", lambda config: (_ for _ in ()).throw(AssertionError("ran")))
    assert main(["refine-and-export", str(tmp_path / "o.gguf"), "--gpu-layers", "-1", "-q"]) == 2
    assert "without GPU offload" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("bad", [-2, -100, 1.5, True])
def test_bad_gpu_layers_values(bad: Any, tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_build(monkeypatch, True)
    with pytest.raises(UserInputError, match="--gpu-layers"):
        ValidateConfig(sparse=tiny["gguf"], dense=str(tiny["gguf"]), gpu_layers=bad)


def test_open_llama_checks_the_build_before_constructing(tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _gpu_build(monkeypatch, False)
    calls = _in_process(monkeypatch)
    with pytest.raises(UserInputError, match="without GPU offload"):
        llamacpp_loader.open_llama(tiny["gguf"], n_ctx=16, n_gpu_layers=2)
    assert calls == []
    llm = llamacpp_loader.open_llama(tiny["gguf"], n_ctx=16)
    llm.close()
    assert calls[0]["n_gpu_layers"] == 0
