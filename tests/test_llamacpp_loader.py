"""The one llama.cpp loader (extra-buffer policy for AMX CPUs) and the child process that contains crashes.

Every zero-keeping type the exporter offers is run in llama.cpp here, each in a child process, so a
type that crashes llama.cpp on some CPU fails its test instead of killing the suite.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llama_cpp")

from converters.gguf_export import ExportConfig, export_gguf  # noqa: E402
from converters.gguf_types import OUTPUT_TYPES  # noqa: E402
from converters.llamacpp_loader import (  # noqa: E402
    EXTRA_BUFTS_ENV,
    ExtraBuffers,
    build_features,
    cpu_flags,
    open_llama,
    resolve_extra_buffers,
)
from dsnot_deploy.cli import main  # noqa: E402
from dsnot_deploy.errors import UserInputError  # noqa: E402
from dsnot_deploy.evaluation.llamacpp_child import (  # noqa: E402
    FAULT_ENV,
    LlamaCppCrash,
    run_isolated,
)
from dsnot_deploy.evaluation.llamacpp_runtime import isolated_logits  # noqa: E402
from tests.child_targets import crash_while_decoding, raise_user_error  # noqa: E402
from tests.test_export import _dequantized_state, _sparsify, _torch_logits  # noqa: E402
from tests.tiny_models import save_tiny_checkpoint  # noqa: E402

ZERO_KEEPING_TYPES = sorted(name for name, t in OUTPUT_TYPES.items() if t.keeps_zeros)
PROMPT = [1, 5, 9, 20, 33, 40, 50, 60, 70, 80, 90, 100, 17, 18, 19, 21]
AMX_CPU = frozenset({"avx512f", "amx_tile", "amx_int8", "amx_bf16"})
ON = ExtraBuffers(True, "on", "test")
OFF = ExtraBuffers(False, "off", "test")


# --------------------------------------------------------------------------- the policy


def test_cpu_flags_reads_x86_and_arm_cpuinfo(tmp_path: Path) -> None:
    x86 = tmp_path / "x86"
    x86.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_tile amx_int8\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    arm = tmp_path / "arm"
    arm.write_text("processor\t: 0\nFeatures\t: fp asimd sve\n")
    assert cpu_flags(x86) == frozenset({"fpu", "avx2", "amx_tile", "amx_int8"})
    assert cpu_flags(arm) == frozenset({"fp", "asimd", "sve"})
    assert cpu_flags(tmp_path / "missing") == frozenset()


def test_default_is_off_on_every_cpu(monkeypatch) -> None:
    monkeypatch.delenv(EXTRA_BUFTS_ENV, raising=False)
    for flags in (AMX_CPU, frozenset({"avx2"}), frozenset()):
        choice = resolve_extra_buffers(flags=flags, build=frozenset({"AMX_INT8", "REPACK"}))
        assert choice.enabled is False and choice.policy == "off"


def test_auto_turns_extra_buffers_off_only_for_amx_cpu_with_amx_build() -> None:
    def auto(flags: frozenset[str], build: set[str]) -> bool:
        return resolve_extra_buffers("auto", flags=flags, build=frozenset(build)).enabled

    assert auto(AMX_CPU, {"AVX512", "AMX_INT8"}) is False
    assert auto(AMX_CPU, {"AVX512", "REPACK"}) is True
    assert auto(frozenset({"avx2", "avx512f"}), {"AMX_INT8"}) is True
    assert auto(frozenset(), set()) is True


@pytest.mark.parametrize("value,enabled", [("on", True), ("off", False), ("OFF", False)])
def test_environment_forces_the_policy(value: str, enabled: bool, monkeypatch) -> None:
    monkeypatch.setenv(EXTRA_BUFTS_ENV, value)
    choice = resolve_extra_buffers(flags=AMX_CPU, build=frozenset({"AMX_INT8"}))
    assert choice.enabled is enabled and choice.policy == value.lower()


def test_bad_policy_is_a_user_error(monkeypatch) -> None:
    monkeypatch.setenv(EXTRA_BUFTS_ENV, "sometimes")
    with pytest.raises(UserInputError, match=EXTRA_BUFTS_ENV):
        resolve_extra_buffers()


def test_build_features_parse_this_build() -> None:
    features = build_features()
    assert features, "llama_print_system_info listed no feature"
    assert all(name == name.strip() and " " not in name for name in features)


# --------------------------------------------------------------------------- the loader


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 50% sparse Llama whose rows are 256 wide, so the K-quant types are real K-quants."""
    ckpt = save_tiny_checkpoint(tmp_path_factory.mktemp("wide") / "llama", arch="llama", hidden_size=256,
                                intermediate_size=512, head_dim=64)
    _sparsify(ckpt, 0.5)
    return ckpt


@pytest.fixture(scope="module")
def exported(wide: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("types")
    out = {}
    for qtype in ZERO_KEEPING_TYPES:
        out[qtype] = root / f"{qtype}.gguf"
        export_gguf(wide, out[qtype], ExportConfig(qtype=qtype, progress=False))
    return out


def _buffer_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "model buffer size" in r.getMessage()]


def test_open_llama_applies_the_policy(exported: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    """With extra buffer types off every weight sits in the plain CPU buffer (llama.cpp's own load log);
    with them on, this build repacks Q4_0 where it has a repacking kernel (REPACK in its features)."""
    caplog.set_level(logging.DEBUG, logger="llama_cpp.native")
    llm = open_llama(exported["Q4_0"], n_ctx=32, extra_buffers=OFF)
    assert llm.model_params.use_extra_bufts is False
    llm.close()
    off = _buffer_lines(caplog)
    assert off and not any("REPACK" in line or "AMX" in line for line in off), off
    caplog.clear()
    llm = open_llama(exported["Q4_0"], n_ctx=32, extra_buffers=ON)
    assert llm.model_params.use_extra_bufts is True
    llm.close()
    if "REPACK" in build_features() and "avx2" in cpu_flags():
        assert any("REPACK" in line or "AMX" in line for line in _buffer_lines(caplog)), _buffer_lines(caplog)


@pytest.mark.parametrize("qtype", ZERO_KEEPING_TYPES)
def test_every_zero_keeping_type_runs_in_llamacpp(qtype: str, wide: Path, exported: dict[str, Path]) -> None:
    """Each type decodes (in a child: a crash is a failure with the type named) like torch on the same
    weights dequantized, with the default policy; and with ``auto`` (the repacking kernels where they
    are safe: on this machine unless it has AMX with an AMX build) the logits stay close."""
    path = exported[qtype]
    got = isolated_logits(path, PROMPT, n_ctx=32).astype(np.float64)
    same_weights = _torch_logits(wide, PROMPT, _dequantized_state(path, wide))
    assert np.isfinite(got).all()
    assert np.abs(got - same_weights).max() < 0.05, f"{qtype}: {np.abs(got - same_weights).max()}"
    repacked = isolated_logits(path, PROMPT, n_ctx=32, extra_buffers=resolve_extra_buffers("auto"))
    repacked = repacked.astype(np.float64)
    assert np.abs(got - repacked).max() < 0.02, f"{qtype}: off vs on {np.abs(got - repacked).max()}"


# --------------------------------------------------------------------------- crash containment


def test_child_crash_becomes_llamacpp_crash(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv(FAULT_ENV, "segv")
    with pytest.raises(LlamaCppCrash) as info:
        run_isolated(crash_while_decoding, str(tmp_path / "m.gguf"))
    text = str(info.value)
    assert "SIGSEGV" in text and "m.gguf" in text and "type Q4_0" in text and "llama-cpp-python" in text


def test_child_errors_come_back_as_the_same_error() -> None:
    with pytest.raises(UserInputError, match="expected a thing"):
        run_isolated(raise_user_error, "expected a thing, found another")


def test_validate_crash_is_one_line_exit_1_and_no_report(exported: dict[str, Path], tmp_path: Path,
                                                          monkeypatch, capsys) -> None:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"line {i} of a text about foxes and dogs." for i in range(400)))
    report = tmp_path / "report.json"
    monkeypatch.setenv(FAULT_ENV, "segv")
    code = main(["validate", str(exported["Q8_0"]), "--dense", str(exported["F16"]), "--text", str(text),
                 "--ctx", "32", "--max-chunks", "2", "--json", str(report), "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1, err
    assert "llama.cpp crashed (SIGSEGV" in err and "F16.gguf (type F16)" in err and "llama-cpp-python 0.3.36" in err
    assert not report.exists() and not list(tmp_path.glob("*.json*"))
    monkeypatch.delenv(FAULT_ENV)
    assert main(["validate", str(exported["Q8_0"]), "--dense", str(exported["F16"]), "--text", str(text),
                 "--ctx", "32", "--max-chunks", "2", "--json", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["llamacpp_runtime"]["llamacpp"] == "llama-cpp-python 0.3.36"
