"""Resource limits: a job whose activations cannot fit is refused before calibration, with the estimate."""

from __future__ import annotations

from pathlib import Path

import pytest

from dsnot_deploy.algorithms.config import PruneConfig
from dsnot_deploy.cli import main
from dsnot_deploy.layerwise import resources
from dsnot_deploy.layerwise.estimate import RunShape, shape_of
from dsnot_deploy.layerwise.resources import memory_needs
from tests.reliability_helpers import TEXT, listing, refine_args
from tests.tiny_models import make_tiny_model, save_tiny_checkpoint

ACT_BYTES = 2 * 4 * 32 * 64 * 4  # 2 buffers x nsamples x seqlen x hidden x float32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("res")
    ckpt = save_tiny_checkpoint(root / "llama", arch="llama")
    text = root / "calib.txt"
    text.write_text(TEXT)
    return ckpt, text


def test_activation_term_is_two_buffers_of_the_calibration_and_loaded_weights_are_not_counted() -> None:
    shape = shape_of(make_tiny_model("llama"))
    run = RunShape(nsamples=4, seqlen=32, dtype="float32", device="cpu")
    loaded = memory_needs(shape, run, PruneConfig(), weights_loaded=True)
    fresh = memory_needs(shape, run, PruneConfig(), weights_loaded=False)
    (host,) = loaded
    assert host.terms["activations (2 x nsamples x seqlen x hidden)"] == ACT_BYTES
    assert not any(k.startswith("weights") for k in host.terms)
    assert fresh[0].needed - host.needed == shape.params * 4
    half = memory_needs(shape, RunShape(nsamples=4, seqlen=32, dtype="bfloat16"), PruneConfig(), weights_loaded=True)
    assert half[0].terms["activations (2 x nsamples x seqlen x hidden)"] == ACT_BYTES // 2


def test_offloaded_activations_count_against_the_host_not_the_gpu(monkeypatch) -> None:
    monkeypatch.setattr(resources, "available_device_bytes", lambda device: 10**12)
    monkeypatch.setattr(resources, "available_host_bytes", lambda: 10**12)
    shape = shape_of(make_tiny_model("llama"))
    run = RunShape(nsamples=4, seqlen=32, device="cuda:0", activations="cpu")
    by_place = {n.place: n for n in memory_needs(shape, run, PruneConfig(), weights_loaded=True)}
    # the default's model correction carries the dense model's activations too, in the same place
    assert by_place["host"].terms == {"activations (2 x nsamples x seqlen x hidden)": ACT_BYTES,
                                      "the dense model's activations (2 x nsamples x seqlen x hidden)": ACT_BYTES}
    assert not any("activations" in k for k in by_place["cuda:0"].terms)


@pytest.mark.parametrize("extra", [(), ("--stream",)], ids=["memory", "stream"])
def test_refine_refuses_a_job_that_does_not_fit_with_the_estimate(tiny, tmp_path: Path, monkeypatch, capsys,
                                                                  extra) -> None:
    ckpt, text = tiny
    monkeypatch.setattr(resources, "available_host_bytes", lambda: ACT_BYTES // 2)
    before = listing(tmp_path)
    assert main(refine_args(ckpt, text, tmp_path / "out", "--sparsity", "0.5", *extra)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "expected the job to fit in cpu (host)" in err
    assert f"activations 2 x 4 x 32 x 64 x float32 = {ACT_BYTES / 1e6:.1f} MB" in err
    assert f"only {ACT_BYTES / 2e6:.1f} MB is available" in err
    assert "--offload-activations" in err and "--offload-dir" in err and "--stream" in err and "--nsamples" in err
    assert listing(tmp_path) == before  # nothing written, no resume state


def test_no_memory_check_runs_anyway(tiny, tmp_path: Path, monkeypatch) -> None:
    ckpt, text = tiny
    monkeypatch.setattr(resources, "available_host_bytes", lambda: 1)
    assert main(refine_args(ckpt, text, tmp_path / "out", "--sparsity", "0.5", "--no-memory-check")) == 0


def test_disk_offload_and_output_need_disk_space(tiny, tmp_path: Path, monkeypatch, capsys) -> None:
    ckpt, text = tiny
    offload = tmp_path / "acts"
    offload.mkdir()
    monkeypatch.setattr(resources, "available_disk_bytes", lambda folder: 1000)
    assert main(refine_args(ckpt, text, tmp_path / "out", "--offload-dir", str(offload))) == 2
    err = capsys.readouterr().err
    assert "expected the job to fit in disk (" in err and "output checkpoint" in err and "free some space" in err
    assert not (tmp_path / "out").exists()
