"""The legacy compressed-tensors sparse-bitmask / sparse-24-bitmask layout: exact layout, round trips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from converters.bitmask_checkpoint import compress_weight, decompress_weight, mask_24
from dsnot_deploy.cli import main
from tests.tiny_models import save_tiny_checkpoint


def test_hand_built_unstructured_example_matches_the_documented_layout() -> None:
    w = torch.tensor([[1.5, 0.0, -2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0],
                      [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, -1.0]])
    parts = compress_weight(w, "sparse-bitmask")
    assert parts["shape"].tolist() == [2, 10] and parts["shape"].dtype == torch.int64
    assert parts["compressed"].tolist() == [1.5, -2.0, 3.0, 4.0, -1.0]
    # row 0 kept bits 0,2,3,8 -> bytes 0b00001101 = 13, 0b00000001 = 1; row 1 bit 9 -> 0, 0b10 = 2
    assert parts["bitmask"].dtype == torch.uint8
    assert parts["bitmask"].tolist() == [[13, 1], [0, 2]]
    assert parts["row_offsets"].tolist() == [0, 4] and parts["row_offsets"].dtype == torch.int64
    assert torch.equal(decompress_weight(parts, "sparse-bitmask", "w"), w)


def test_hand_built_24_example() -> None:
    w = torch.tensor([[1.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0]])  # second group has one non-zero
    parts = compress_weight(w, "sparse-24-bitmask")
    assert "row_offsets" not in parts
    assert parts["compressed"].shape == (1, 4)
    assert parts["compressed"].tolist() == [[1.0, 2.0, 0.0, 3.0]]  # the first zero slot fills the group
    assert parts["bitmask"].tolist() == [[0b10011001]]
    assert torch.equal(decompress_weight(parts, "sparse-24-bitmask", "w"), w)
    assert mask_24(torch.tensor([[True, True, True, False]])) is None  # 3 non-zeros: not 2:4


def test_negative_zero_and_bf16_are_bit_exact() -> None:
    w = torch.tensor([[-0.0, 0.0, 1.0, 0.0], [0.0, 2.0, -0.0, 0.0]], dtype=torch.bfloat16)  # 2:4 holds
    for fmt in ("sparse-bitmask", "sparse-24-bitmask"):
        back = decompress_weight(compress_weight(w, fmt), fmt, "w")
        assert back.dtype == torch.bfloat16 and torch.equal(back.view(torch.int16), w.view(torch.int16))


def _sparse_checkpoint(root: Path, pattern: str) -> Path:
    ckpt = save_tiny_checkpoint(root / "dense", arch="llama")
    path = ckpt / "model.safetensors"
    state = load_file(str(path))
    g = torch.Generator().manual_seed(0)
    for name, t in state.items():
        if ".layers." in name and name.endswith("proj.weight"):
            if pattern == "2:4":
                grp = t.reshape(-1, 4)
                idx = torch.argsort(torch.rand(grp.shape, generator=g), dim=1)[:, :2]
                grp.scatter_(1, idx, 0.0)
            else:
                t[torch.rand(t.shape, generator=g) < 0.6] = 0.0
    save_file(state, str(path), metadata={"format": "pt"})
    return ckpt


@pytest.mark.parametrize("fmt,pattern", [("sparse-bitmask", "0.6"), ("sparse-24-bitmask", "2:4")])
def test_checkpoint_round_trip_is_bit_exact(tmp_path: Path, fmt: str, pattern: str) -> None:
    ckpt = _sparse_checkpoint(tmp_path, pattern)
    packed, restored = tmp_path / "packed", tmp_path / "restored"
    assert main(["pack", "--format", fmt, str(ckpt), str(packed), "-q"]) == 0
    cfg = json.loads((packed / "config.json").read_text())
    sc = cfg["quantization_config"]["sparsity_config"]
    assert sc["format"] == fmt and len(sc["targets"]) == 14
    assert sc["sparsity_structure"] == ("2:4" if fmt == "sparse-24-bitmask" else "unstructured")
    keys = load_file(str(packed / "model.safetensors")).keys()
    assert "model.layers.0.mlp.down_proj.bitmask" in keys and "model.layers.0.mlp.down_proj.weight" not in keys
    assert ("model.layers.0.mlp.down_proj.row_offsets" in keys) == (fmt == "sparse-bitmask")
    assert "model.embed_tokens.weight" in keys  # dense tensors stay as they are
    assert (packed / "model.safetensors").stat().st_size < (ckpt / "model.safetensors").stat().st_size
    assert main(["unpack", str(packed), str(restored), "-q"]) == 0
    a, b = load_file(str(ckpt / "model.safetensors")), load_file(str(restored / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k
    assert json.loads((restored / "config.json").read_text()) == json.loads((ckpt / "config.json").read_text())
    assert (restored / "tokenizer.json").is_file()


def test_bad_checkpoint_inputs_exit_2(tmp_path: Path, capsys) -> None:
    ckpt = save_tiny_checkpoint(tmp_path / "dense", arch="llama")  # no zeros at all
    assert main(["pack", "--format", "sparse-bitmask", str(ckpt), str(tmp_path / "o"), "-q"]) == 2
    assert "nothing to compress" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["unpack", str(ckpt), str(tmp_path / "o2"), "-q"]) == 2  # not a bitmask checkpoint
    assert not (tmp_path / "o2").exists()
    sparse = _sparse_checkpoint(tmp_path / "s", "0.6")
    packed = tmp_path / "packed"
    assert main(["pack", "--format", "sparse-bitmask", str(sparse), str(packed), "-q"]) == 0
    state = load_file(str(packed / "model.safetensors"))
    state["model.layers.0.mlp.down_proj.compressed"] = state["model.layers.0.mlp.down_proj.compressed"][:-3]
    save_file(state, str(packed / "model.safetensors"))
    assert main(["unpack", str(packed), str(tmp_path / "o3"), "-q"]) == 2
    assert not (tmp_path / "o3").exists()
    assert main(["pack", "--format", "sparse-bitmask", str(sparse), str(packed), "-q"]) == 2  # exists
    assert np.any([p.name == "packed" for p in tmp_path.iterdir()])
