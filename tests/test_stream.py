"""Layer streaming (`refine --stream`), disk offload, device maps, and the CUDA path (skipped without CUDA)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsnot_deploy.algorithms.config import (
    Method,
    PruneConfig,
    Refinement,
    SparsityPattern,
)
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.capture import capture_layer_inputs
from dsnot_deploy.layerwise.refine import (
    STATS_NAME,
    CalibrationConfig,
    RefineJob,
    refine,
)
from dsnot_deploy.sources.models import find_decoder_layers
from dsnot_deploy.sources.streaming_io import build_skeleton
from tests.tiny_models import ARCHS, make_tiny_model, save_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TEXT = " ".join(f"Sentence {i} says hello world; the quick brown fox jumps over the lazy dog." for i in range(300))
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def calib(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(TEXT)
    return path


def _job(ckpt: Path, out: Path, calib: Path, **kw) -> RefineJob:
    prune = kw.pop("prune", PruneConfig())
    return RefineJob(model=str(ckpt), outdir=out, prune=prune, calibration=CalibrationConfig(str(calib), 4, 32, 0),
                     progress=False, **kw)


def _tensors(outdir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in _weight_files(outdir):
        out.update(load_file(f))
    return out


def _weight_files(outdir: Path) -> list[Path]:
    """The checkpoint's weight files (not the calibration statistics written beside them)."""
    return [f for f in sorted(outdir.glob("*.safetensors")) if f.name != STATS_NAME]


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for name in ta:
        assert ta[name].dtype == tb[name].dtype, name
        assert torch.equal(ta[name], tb[name]), name  # bit-identical weights, hence identical masks
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    assert ca == cb


@pytest.mark.parametrize("arch", ARCHS)
def test_stream_equals_in_memory(arch: str, tmp_path: Path, calib: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch=arch)
    m_mem = refine(_job(ckpt, tmp_path / "mem", calib))
    m_str = refine(_job(ckpt, tmp_path / "str", calib, stream=True))
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    for key in ("pruned_linears_zeros", "all_parameters_zeros", "all_parameters_params"):
        assert m_mem["sparsity"][key] == m_str["sparsity"][key], key
    assert m_str["model"]["class"] == m_mem["model"]["class"]
    assert [lin["name"] for lin in m_str["linears"]] == [lin["name"] for lin in m_mem["linears"]]
    assert m_str["run"]["stream"] is True
    # the streamed output is sharded: the non-layer tensors, then one shard per layer, plus the index
    index = json.loads((tmp_path / "str" / "model.safetensors.index.json").read_text())
    layer_shards = {f for name, f in index["weight_map"].items() if ".layers." in name}
    assert len(layer_shards) == 2
    assert len(set(index["weight_map"].values())) == len(_weight_files(tmp_path / "str"))


def test_stream_from_sharded_bf16_checkpoint_with_sparsegpt_dsnot(tmp_path: Path, calib: Path) -> None:
    model = make_tiny_model("qwen2", num_hidden_layers=3)
    model.save_pretrained(tmp_path / "ckpt", max_shard_size="40KB")
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "model.safetensors.index.json").is_file()
    prune = PruneConfig(method=Method.SPARSEGPT, pattern=SparsityPattern.nm(2, 4), refinement=Refinement.DSNOT)
    refine(_job(tmp_path / "ckpt", tmp_path / "mem", calib, prune=prune, dtype="bfloat16"))
    refine(_job(tmp_path / "ckpt", tmp_path / "str", calib, prune=prune, dtype="bfloat16", stream=True))
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    assert _tensors(tmp_path / "str")["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ARCHS)
def test_pass_through_capture_equals_dense_capture(arch: str) -> None:
    """The per-layer arguments recorded without running any layer are those of the dense pass."""
    model = make_tiny_model(arch)
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(1))
    _, layers = find_decoder_layers(model)
    h1, dense = capture_layer_inputs(model, layers, ids, 1, "cpu", "cpu")
    h2, passed = capture_layer_inputs(model, layers, ids, 1, "cpu", "cpu", pass_through=True)
    assert torch.equal(h1, h2)
    flat = lambda call: torch.utils._pytree.tree_flatten((call.args, call.kwargs))  # noqa: E731
    for a, b in zip(dense, passed, strict=True):
        (la, sa), (lb, sb) = flat(a), flat(b)
        assert sa == sb
        for x, y in zip(la, lb, strict=True):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
    if arch == "gemma3":  # the two layers really get different masks
        assert not torch.equal(passed[0].kwargs["attention_mask"], passed[1].kwargs["attention_mask"])


def test_skeleton_holds_no_weights(tmp_path: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="gemma3")
    skeleton = build_skeleton(ckpt, torch.float32)
    assert {p.device.type for p in skeleton.parameters()} == {"meta"}
    assert skeleton.lm_head.weight is skeleton.model.embed_tokens.weight  # tied, as after from_pretrained


def test_disk_offload_and_host_offload_give_identical_results(tmp_path: Path, calib: Path) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama")
    (tmp_path / "act").mkdir()
    refine(_job(ckpt, tmp_path / "mem", calib))
    refine(_job(ckpt, tmp_path / "disk", calib, stream=True, activations_dir=tmp_path / "act"))
    refine(_job(ckpt, tmp_path / "host", calib, offload_activations=True, activations_dir=tmp_path / "act"))
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "disk")
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "host")
    assert list((tmp_path / "act").iterdir()) == []  # activation files are unlinked at once


def test_failure_mid_stream_leaves_nothing(tmp_path: Path, calib: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama")
    import dsnot_deploy.layerwise.stream as stream

    real = stream.process_layer

    def fail_on_second(index, *args, **kwargs):
        if index == 1:
            raise RuntimeError("boom")
        return real(index, *args, **kwargs)

    monkeypatch.setattr(stream, "process_layer", fail_on_second)
    with pytest.raises(RuntimeError, match="boom"):
        refine(_job(ckpt, tmp_path / "out", calib, stream=True, save_state=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no output, no temporary folder


def test_stream_refuses_gguf_and_missing_safetensors(tmp_path: Path, calib: Path) -> None:
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(UserInputError, match="GGUF.*without\\s+--stream"):
        refine(_job(gguf, tmp_path / "o1", calib, stream=True))
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(UserInputError, match="model.safetensors"):
        refine(_job(folder, tmp_path / "o2", calib, stream=True))
    with pytest.raises(UserInputError, match="either --stream"):
        _job(folder, tmp_path / "o3", calib, stream=True, device_map="auto")


def test_cli_stream_dry_run_and_device_map(tmp_path: Path, calib: Path, capsys) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="llama")
    base = ["refine", str(ckpt), "--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "-q"]
    assert main([*base[:2], str(tmp_path / "dry"), *base[2:], "--dry-run", "--stream"]) == 0
    out = capsys.readouterr().out
    assert "dry run" in out and "per layer" in out and "activations" in out
    assert not (tmp_path / "dry").exists()
    assert main([*base[:2], str(tmp_path / "mem"), *base[2:]]) == 0
    assert main([*base[:2], str(tmp_path / "str"), *base[2:], "--stream"]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    # a device map that pins every module to the CPU exercises the in-place path (layers not moved)
    device_map = tmp_path / "map.json"
    device_map.write_text(json.dumps({"": "cpu"}))
    assert main([*base[:2], str(tmp_path / "map"), *base[2:], "--device-map", str(device_map)]) == 0
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "map")
    assert main([*base[:2], str(tmp_path / "bad"), *base[2:], "--device-map", str(tmp_path / "nope.json")]) == 2
    assert "device-map" in capsys.readouterr().err


_RSS_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from dsnot_deploy.algorithms.config import PruneConfig, Refinement
    from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob, refine
    ckpt, out, calib, stream = sys.argv[1], Path(sys.argv[2]), sys.argv[3], sys.argv[4] == "1"
    refine(RefineJob(model=ckpt, outdir=out, prune=PruneConfig(refinement=Refinement.NONE),
                     calibration=CalibrationConfig(calib, 2, 32, 0), progress=False, stream=stream))
    # The child's own peak (kB), not ru_maxrss: Linux copies the spawning process's peak RSS (here
    # pytest's, after whatever ran before) into the child's ru_maxrss at exec, which would hide growth.
    print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
    """
)


def _peak_rss_mb(ckpt: Path, out: Path, calib: Path, stream: bool) -> float:
    # A fixed glibc mmap threshold: by default glibc raises it after each large free (up to 32 MB), so
    # these 4 MB tensors land in the heap in a layout that varies from run to run, and the peak of
    # identical runs varies by up to ~80 MB (5 layers' worth) at random.  Tensors of real models are
    # above 32 MB and are always mmapped; this makes the tiny ones behave the same (docs/bench_memory.md).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    result = subprocess.run([sys.executable, "-c", _RSS_CHILD, str(ckpt), str(out), str(calib), "1" if stream else "0"],
                            capture_output=True, text=True, cwd=ROOT, timeout=300, check=True, env=env)
    return int(result.stdout.split()[-1]) / 1024  # VmHWM is in kB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc/self/status")
def test_streaming_peak_rss_does_not_grow_with_depth(tmp_path: Path, calib: Path) -> None:
    """2 vs 8 layers of the same width (hidden 512): each layer adds about 17 MB of float32 weights.

    A run holding every layer grows by six layers' weights, about 100 MB (scripts/bench_memory.py
    measures the in-memory slope next to the streaming one).  The streaming run must stay within
    about two layers' worth (measured: 1 MB apart; in memory 97 MB).
    """
    width = dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8, head_dim=64)
    shallow = save_tiny_checkpoint(tmp_path / "l2", arch="llama", num_hidden_layers=2, **width)
    deep = save_tiny_checkpoint(tmp_path / "l8", arch="llama", num_hidden_layers=8, **width)
    per_layer_mb = sum(p.numel() for p in make_tiny_model("llama", num_hidden_layers=1, **width)
                       .model.layers[0].parameters()) * 4 / 2**20
    growth = _peak_rss_mb(deep, tmp_path / "s8", calib, True) - _peak_rss_mb(shallow, tmp_path / "s2", calib, True)
    assert growth < 0.35 * 6 * per_layer_mb, (growth, per_layer_mb)


# ------------------------------------------------------------------------------------------ CUDA
# Skipped without CUDA (CI, and the machines this was written on).  scripts/cuda_check.py is not
# needed: `python -m pytest -q tests/test_stream.py -k cuda` on a GPU machine runs these.


@CUDA
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_stream_equals_in_memory(tmp_path: Path, calib: Path, dtype: str) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "ckpt", arch="gemma3")
    refine(_job(ckpt, tmp_path / "mem", calib, device="cuda", dtype=dtype))
    refine(_job(ckpt, tmp_path / "str", calib, device="cuda", dtype=dtype, stream=True))
    refine(_job(ckpt, tmp_path / "off", calib, device="cuda", dtype=dtype, stream=True, offload_activations=True))
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "str")
    _assert_same_checkpoint(tmp_path / "mem", tmp_path / "off")


@CUDA
def test_cuda_statistics_are_float32_for_half_models() -> None:
    from dsnot_deploy.layerwise.driver import DriverConfig, _calibrate, _linears

    model = make_tiny_model("llama").to("cuda", torch.float16)
    _, layers = find_decoder_layers(model)
    ids = torch.randint(4, 128, (2, 32), generator=torch.Generator().manual_seed(0))
    hidden, calls = capture_layer_inputs(model, layers, ids, 1, "cuda", "cuda")
    stats = _calibrate(layers[0], _linears(layers[0]), hidden, calls[0],
                       DriverConfig(prune=PruneConfig(), device="cuda", progress=False), with_hessian=True)
    st = stats["self_attn.q_proj"]
    assert st.sq_sum.dtype == torch.float32 and st.xtx.dtype == torch.float32 and st.sq_sum.is_cuda
