"""`refine --resume`: an interrupted run continues from its last finished layer and gives the same result."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import pytest

from dsnot_deploy.cli import main
from dsnot_deploy.layerwise import driver, stream
from dsnot_deploy.layerwise.resume import state_dir_for
from tests.reliability_helpers import TEXT, assert_same_checkpoint, refine_args
from tests.tiny_models import save_tiny_checkpoint

N_LAYERS = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("resume")
    ckpt = save_tiny_checkpoint(root / "llama", arch="llama", num_hidden_layers=N_LAYERS)
    text = root / "calib.txt"
    text.write_text(TEXT)
    return ckpt, text


class Injected(Exception):
    pass


def _fail_at(monkeypatch: pytest.MonkeyPatch, module, layer: int) -> list[int]:
    """Make `module.process_layer` raise when it reaches `layer` (a crash in the middle of the run)."""
    real = module.process_layer
    seen: list[int] = []

    def failing(index, *args, **kwargs):
        seen.append(index)
        if index == layer:
            raise Injected(f"injected failure at layer {index}")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(module, "process_layer", failing)
    return seen


@pytest.mark.parametrize("mode,module,extra", [
    ("memory", driver, ("--method", "wanda", "--sparsity", "0.6")),
    ("memory-sparsegpt-2:4", driver, ("--method", "sparsegpt", "--pattern", "2:4", "--refine", "dsnot",
                                      "--measure-error")),
    ("stream", stream, ("--method", "wanda", "--sparsity", "0.6", "--stream")),
    # the dense stream (reconstruction toward the dense model) must advance through restored layers too
    ("memory-model-target", driver, ("--method", "wanda", "--sparsity", "0.6", "--model-correction", "0.25")),
    ("stream-model-target", stream, ("--method", "wanda", "--sparsity", "0.6", "--model-correction", "0.25",
                                     "--stream")),
], ids=lambda v: v if isinstance(v, str) else "")
def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny, tmp_path: Path, monkeypatch, capsys,
                                                             mode, module, extra) -> None:
    ckpt, text = tiny
    reference = tmp_path / "reference"
    assert main(refine_args(ckpt, text, reference, *extra)) == 0
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_at(m, module, 2)
        assert main(refine_args(ckpt, text, out, *extra)) == 1  # an internal error, reported in one line
    assert "injected failure at layer 2" in capsys.readouterr().err
    assert not out.exists()
    state = state_dir_for(out)
    saved = json.loads((state / "state.json").read_text())
    assert saved["layers_done"] == 2 and saved["n_layers"] == N_LAYERS
    # the resumed run only prunes the unfinished layers
    seen = _fail_at(monkeypatch, module, -1)
    assert main(refine_args(ckpt, text, out, *extra, "--resume")) == 0
    assert seen == [2, 3]
    assert not state.exists()  # removed once the output is in place
    assert_same_checkpoint(reference, out)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_resume_refuses_different_settings_and_plain_rerun_needs_resume_or_force(tiny, tmp_path, monkeypatch,
                                                                                  capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_at(m, driver, 1)
        assert main(refine_args(ckpt, text, out, "--sparsity", "0.5")) == 1
    capsys.readouterr()
    state = state_dir_for(out)
    before = (state / "state.json").read_bytes()
    # different sparsity: refused, naming the setting; state untouched
    assert main(refine_args(ckpt, text, out, "--sparsity", "0.6", "--resume")) == 2
    err = capsys.readouterr().err
    assert "prune" in err and "--resume" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    # different calibration seed changes the tokens
    assert main(refine_args(ckpt, text, out, "--sparsity", "0.5", "--seed", "3", "--resume")) == 2
    err = capsys.readouterr().err
    assert "calibration" in err and "calibration_tokens_sha256" in err
    assert (state / "state.json").read_bytes() == before
    # a plain rerun must not silently throw the finished layers away
    assert main(refine_args(ckpt, text, out, "--sparsity", "0.5")) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--force" in err and "1 of 4 layers" in err
    assert (state / "state.json").read_bytes() == before and not out.exists()
    # --force starts over (and succeeds)
    seen = _fail_at(monkeypatch, driver, -1)
    assert main(refine_args(ckpt, text, out, "--sparsity", "0.5", "--force")) == 0
    assert seen == [0, 1, 2, 3] and not state.exists() and (out / "sparsity.json").is_file()


def test_resume_without_state_runs_from_the_start(tiny, tmp_path: Path) -> None:
    ckpt, text = tiny
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(refine_args(ckpt, text, a, "--sparsity", "0.5", "--resume")) == 0
    assert main(refine_args(ckpt, text, b, "--sparsity", "0.5", "--no-save-state")) == 0
    assert_same_checkpoint(a, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_a_state_locked_by_a_running_refine_is_refused(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "out"
    state = state_dir_for(out)
    state.mkdir()
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # what a running refine holds
        assert main(refine_args(ckpt, text, out, "--sparsity", "0.5")) == 2
        assert "locked by another running" in capsys.readouterr().err
    finally:
        os.close(fd)
    assert not out.exists()


def test_damaged_state_is_a_clear_error(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_at(m, driver, 2)
        assert main(refine_args(ckpt, text, out, "--sparsity", "0.5")) == 1
    state = state_dir_for(out)
    (state / "layer-00001.safetensors").write_bytes(b"garbage")
    capsys.readouterr()
    assert main(refine_args(ckpt, text, out, "--sparsity", "0.5", "--resume")) == 2
    err = capsys.readouterr().err
    assert "layer-00001.safetensors" in err and "damaged" in err and "Traceback" not in err
    assert not out.exists()


def test_resume_and_no_save_state_conflict(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    assert main(refine_args(ckpt, text, tmp_path / "o", "--resume", "--no-save-state")) == 2
    assert "--no-save-state" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
