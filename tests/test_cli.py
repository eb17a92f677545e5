"""The `refine` and `eval` commands end to end on tiny checkpoints, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from dsnot_deploy.cli import main
from tests.tiny_models import save_tiny_checkpoint

TEXT = " ".join(
    f"Sentence number {i} tells the quick brown fox to jump over the lazy dog, hello world." for i in range(200)
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    ckpt = save_tiny_checkpoint(root / "llama", arch="llama")
    text = root / "calib.txt"
    text.write_text(TEXT)
    return ckpt, text


def _refine_args(ckpt: Path, text: Path, out: Path, *extra: str) -> list[str]:
    return ["refine", str(ckpt), str(out), "--calib", str(text), "--nsamples", "4", "--seqlen", "32", "-q", *extra]


@pytest.mark.parametrize(
    "extra",
    [
        ("--method", "wanda", "--sparsity", "0.6"),
        ("--method", "sparsegpt", "--pattern", "2:4", "--dsnot"),
        ("--method", "magnitude", "--sparsity", "0.5", "--refine", "exact", "--measure-error"),
    ],
    ids=["wanda-exact", "sparsegpt-dsnot", "magnitude-exact"],
)
def test_refine_writes_a_loadable_checkpoint_and_manifest(tiny, tmp_path: Path, extra, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "sparse"
    assert main(_refine_args(ckpt, text, out, *extra)) == 0
    assert "wrote" in capsys.readouterr().out
    manifest = json.loads((out / "sparsity.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    zeros = total = 0
    for name, p in model.named_parameters():
        if ".layers." in name and name.endswith("proj.weight"):
            zeros += int((p == 0).sum())
            total += p.numel()
            assert not torch.signbit(p[p == 0]).any(), f"{name}: pruned weights stored as -0.0"
    assert manifest["sparsity"]["pruned_linears_zeros"] == zeros
    assert manifest["sparsity"]["pruned_linears"] == pytest.approx(zeros / total)
    target = manifest["pattern"]["target_sparsity"]
    for lin in manifest["linears"]:  # int(cols * s) zeros per row at least (exact zeros may add more)
        assert lin["zeros"] >= lin["rows"] * int(lin["cols"] * target)
    assert manifest["calibration"] == {"source": str(text), "nsamples": 4, "seqlen": 32, "seed": 0}
    assert len(manifest["linears"]) == 14 and manifest["times"]["end_to_end_seconds"] > 0
    from safetensors.torch import load_file

    stats = load_file(out / "calibration_stats.safetensors")  # llama.cpp's imatrix entries for `export`
    assert len(stats) == 14 and all(v.ndim == 1 and bool((v >= 0).all()) and float(v.sum()) > 0 for v in stats.values())
    layer0 = "model.layers.0.self_attn."
    assert torch.equal(stats[layer0 + "q_proj"], stats[layer0 + "k_proj"])  # one input, one statistic
    assert stats["model.layers.0.mlp.down_proj"].shape == (model.config.intermediate_size,)
    assert (out / "tokenizer.json").exists() or (out / "tokenizer_config.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_refine_is_deterministic(tiny, tmp_path: Path) -> None:
    ckpt, text = tiny
    for name in ("a", "b"):
        assert main(_refine_args(ckpt, text, tmp_path / name, "--sparsity", "0.5")) == 0
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_eval_both_protocols(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    for protocol in ("paper", "llamacpp"):
        report = tmp_path / f"{protocol}.json"
        assert main(["eval", str(ckpt), "--text", str(text), "--protocol", protocol, "--seqlen", "64",
                     "--max-chunks", "3", "--json", str(report), "-q"]) == 0
        data = json.loads(report.read_text())
        assert data["protocol"] == protocol and data["n_chunks"] == 3 and data["ppl"] > 1
        assert f"{data['ppl']:.4f}" in capsys.readouterr().out


BAD_REFINE = [
    (("--sparsity", "0"), "sparsity"),
    (("--sparsity", "1"), "sparsity"),
    (("--sparsity", "-0.2"), "sparsity"),
    (("--sparsity", "nan"), "sparsity"),
    (("--pattern", "4:4"), "N < M"),
    (("--pattern", "3:5"), "divisible by 5"),
    (("--method", "obs"), "invalid choice"),
    (("--nsamples", "3", "--batch-size", "2"), "batch size"),
    (("--nsamples", "4", "--seqlen", "100000"), "tokens"),
]


@pytest.mark.parametrize("extra,message", BAD_REFINE, ids=[" ".join(e) for e, _ in BAD_REFINE])
def test_refine_bad_inputs_exit_2_without_output(tiny, tmp_path: Path, extra, message, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "out"
    with pytest.raises(SystemExit) if "invalid choice" in message else _no_raise():
        code = main(["refine", str(ckpt), str(out), "--calib", str(text), "-q", "--nsamples", "4",
                     "--seqlen", "32", *extra])
        assert code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2
    assert not out.exists() and not list(tmp_path.iterdir())


class _no_raise:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_refine_missing_model_and_empty_text(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    assert main(["refine", str(tmp_path / "nope"), str(tmp_path / "o"), "--calib", str(text), "-q"]) == 2
    assert "nope" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert main(["refine", str(ckpt), str(tmp_path / "o"), "--calib", str(empty), "-q"]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["refine", str(ckpt), str(tmp_path / "o"), "--calib", str(tmp_path / "missing.txt"), "-q"]) == 2
    assert not (tmp_path / "o").exists()


def test_refine_refuses_existing_output_without_force(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(_refine_args(ckpt, text, out, "--sparsity", "0.5")) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(_refine_args(ckpt, text, out, "--sparsity", "0.5", "--force")) == 0
    assert (out / "sparsity.json").exists() and not (out / "keep.txt").exists()


def test_refine_unsupported_architecture(tmp_path: Path, tiny, capsys) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    _, text = tiny
    gpt2 = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=128)).save_pretrained(gpt2)
    from tests.tiny_models import make_tiny_tokenizer

    make_tiny_tokenizer().save_pretrained(gpt2)
    assert main(_refine_args(gpt2, text, tmp_path / "o", "--sparsity", "0.5")) == 2
    err = capsys.readouterr().err
    assert "nn.Linear" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_eval_bad_inputs(tiny, tmp_path: Path, capsys) -> None:
    ckpt, text = tiny
    short = tmp_path / "short.txt"
    short.write_text("hello world")
    assert main(["eval", str(ckpt), "--text", str(short), "--seqlen", "64", "-q"]) == 2
    assert "one chunk needs" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "--text", str(text), "--json", str(tmp_path / "no" / "r.json"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["refine"], ["eval"]])
def test_help(command: list[str], capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main([*command, "--help"])
    assert exc.value.code == 0
    assert "usage: dsnot-deploy" in capsys.readouterr().out


def test_torch_threads_untouched_by_import() -> None:
    import importlib

    n = torch.get_num_threads()
    importlib.import_module("dsnot_deploy.cli")
    assert torch.get_num_threads() == n


def test_outputs_get_the_umask_mode_not_0600(tmp_path: Path) -> None:
    """Reports and JSON files are ordinary files (0666 minus the umask), like the GGUF llama.cpp writes."""
    import os

    from dsnot_deploy.atomic import atomic_write_bytes

    old = os.umask(0o022)
    try:
        atomic_write_bytes(tmp_path / "r.json", b"{}")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
