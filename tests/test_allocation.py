"""Layer-wise allocation (docs/allocation.md): OWL's rule, exact integer counts, and the refine job with it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from dsnot_deploy.algorithms.allocation import (
    allocate,
    integer_counts,
    outlier_ratio,
    owl_sparsities,
)
from dsnot_deploy.algorithms.config import (
    OWL_FROM_SPARSITY,
    Allocation,
    AllocationConfig,
    Method,
    PruneConfig,
    Refinement,
    SparseGPTConfig,
    SparsityPattern,
)
from dsnot_deploy.algorithms.masks import per_matrix_mask, per_row_mask, prune_count
from dsnot_deploy.algorithms.sparsegpt import sparsegpt_prune
from dsnot_deploy.cli import main
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.layerwise.refine import CalibrationConfig, RefineJob, refine
from tests.tiny_models import checkpoint_tensors, save_tiny_checkpoint

OWL = AllocationConfig(kind=Allocation.OWL)
UNIFORM = AllocationConfig(kind=Allocation.UNIFORM)
TEXT = " ".join(f"Sentence {i} says hello world; the quick brown fox jumps over the lazy dog." for i in range(300))


# -- the pure rule ----------------------------------------------------------------------------------

def test_outlier_ratio_counts_scores_above_m_times_the_layer_mean() -> None:
    g = torch.Generator().manual_seed(0)
    scores = [torch.rand(8, 16, generator=g), torch.rand(4, 32, generator=g) * 20]
    flat = torch.cat([s.reshape(-1) for s in scores]).double()
    for m in (0.5, 1.0, 2.0, 5.0):
        expected = float((flat > flat.mean() * m).double().mean())
        assert outlier_ratio(scores, m) == pytest.approx(expected, abs=0)
    assert outlier_ratio([torch.ones(3, 3)], 1.0) == 0.0  # nothing strictly above the mean


def test_owl_sparsities_keep_the_mean_span_two_lambda_and_prune_outlier_layers_less() -> None:
    ratios = [0.010, 0.030, 0.020, 0.050, 0.012]
    s = owl_sparsities(ratios, 0.6, 0.08)
    assert sum(s) / len(s) == pytest.approx(0.6, abs=1e-12)
    assert max(s) - min(s) == pytest.approx(0.16, abs=1e-12)
    order_by_ratio = sorted(range(5), key=lambda i: ratios[i])
    assert [s[i] for i in order_by_ratio] == sorted(s, reverse=True)  # more outliers, less pruning
    assert owl_sparsities([0.02, 0.02, 0.02], 0.5, 0.08) == [0.5, 0.5, 0.5]
    assert owl_sparsities([0.01, 0.05], 0.5, 0.0) == [0.5, 0.5]


@pytest.mark.parametrize("seed", range(5))
def test_integer_counts_sum_exactly_stay_in_bounds_and_within_one_of_the_ideal(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ideal = (torch.rand(12, generator=g) * 40 + 100).tolist()
    total = int(sum(ideal)) - 7
    counts = integer_counts(ideal, total, 1, 200)
    assert sum(counts) == total
    shift = (total - sum(ideal)) / len(ideal)
    assert all(abs(k - (x + shift)) < 1 for k, x in zip(counts, ideal, strict=True))
    clamped = integer_counts([0.2, 5.0, 9.9], 9, 1, 6)  # bounds bind: still the exact total
    assert sum(clamped) == 9 and min(clamped) >= 1 and max(clamped) <= 6
    with pytest.raises(ValueError):
        integer_counts([1.0, 2.0], 20, 1, 6)


def test_prune_count_is_exact_for_count_over_size_and_for_float_products() -> None:
    assert int(90 * 0.7) == 62 and prune_count(90, 0.7) == 63  # 0.7 * 90 = 62.99999999999999
    for size in (49, 64, 576, 1536, 4096, 14336):
        for count in range(1, size, max(size // 97, 1)):
            assert prune_count(size, count / size) == count, (size, count)
    assert prune_count(576, 0.5) == 288 and prune_count(10, 0.05) == 0


def test_allocate_prunes_exactly_the_uniform_count_for_every_linear_name() -> None:
    shapes = [{"attn.q": (64, 64), "mlp.up": (128, 64), "mlp.down": (64, 128)} for _ in range(6)]
    ratios = [0.01, 0.02, 0.04, 0.03, 0.015, 0.05]
    for target in (0.3, 0.5, 0.6, 0.7, 0.9):
        alloc = allocate(ratios, shapes, target, OWL)
        for name, width in (("attn.q", 64), ("mlp.up", 64), ("mlp.down", 128)):
            counts = [alloc.counts[i][name] for i in range(6)]
            assert sum(counts) == 6 * math.floor(width * target + 1e-9), (target, name)
            assert len(set(counts)) > 1  # non-uniform
            for i in range(6):  # the pattern a Linear gets prunes its count per row
                pattern = alloc.pattern(i, name, SparsityPattern.unstructured(target))
                assert prune_count(width, pattern.sparsity) == counts[i]
        # the layer with most outliers is pruned least
        assert alloc.layer_sparsity.index(min(alloc.layer_sparsity)) == ratios.index(max(ratios))
    record = allocate(ratios, shapes, 0.5, OWL).record()
    assert record["kind"] == "owl" and record["outlier_threshold"] == 5.0 and record["spread"] == 0.08
    assert len(record["per_row_counts"]) == 6 and record["outlier_ratios"] == ratios


def test_allocation_config_and_nm_patterns() -> None:
    with pytest.raises(UserInputError):
        AllocationConfig(kind=Allocation.OWL, outlier_threshold=0)
    with pytest.raises(UserInputError):
        AllocationConfig(kind=Allocation.OWL, spread=0.6)
    assert PruneConfig(allocation=OWL).allocates
    assert not PruneConfig(allocation=OWL, pattern=SparsityPattern.nm(2, 4)).allocates
    assert not PruneConfig(allocation=UNIFORM, pattern=SparsityPattern.unstructured(0.8)).allocates


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.6, 0.7, 0.8])
def test_auto_allocation_is_owl_from_the_measured_sparsity(sparsity: float) -> None:
    assert AllocationConfig().kind is Allocation.UNIFORM  # the default (docs/decisions.md)
    auto = AllocationConfig(kind=Allocation.AUTO)
    pattern = SparsityPattern.unstructured(sparsity)
    expected = Allocation.OWL if sparsity >= OWL_FROM_SPARSITY else Allocation.UNIFORM
    assert auto.resolved(pattern) is expected
    assert PruneConfig(pattern=pattern, allocation=auto).allocates is (expected is Allocation.OWL)
    assert not PruneConfig(pattern=pattern).allocates
    assert auto.resolved(SparsityPattern.nm(2, 4)) is Allocation.UNIFORM
    assert OWL.resolved(pattern) is Allocation.OWL and UNIFORM.resolved(pattern) is Allocation.UNIFORM


def test_mask_counts_are_exact() -> None:
    scores = torch.rand(7, 90)
    assert int((~per_row_mask(scores, 0.7)).sum()) == 7 * 63
    assert int((~per_matrix_mask(scores, 0.7)).sum()) == 441


@pytest.mark.parametrize("sparsity", [0.5, 0.6, 0.7, 301 / 576])
def test_sparsegpt_prunes_exactly_floor_rows_cols_s(sparsity: float) -> None:
    g = torch.Generator().manual_seed(1)
    rows, cols = 9, 300  # blocks of 128 do not divide rows * cols * s
    x = torch.randn(256, cols, generator=g)
    weight, mask = sparsegpt_prune(torch.randn(rows, cols, generator=g), x.T @ x / 4,
                                   SparsityPattern.unstructured(sparsity), SparseGPTConfig())
    assert int((~mask).sum()) == prune_count(rows * cols, sparsity)
    assert torch.all(weight[~mask] == 0)


# -- the refine job ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("owl")
    calib = root / "calib.txt"
    calib.write_text(TEXT)
    return save_tiny_checkpoint(root / "ckpt", arch="llama", num_hidden_layers=4), calib


def _refine(tiny: tuple[Path, Path], out: Path, **prune_kw) -> dict:
    ckpt, calib = tiny
    job = RefineJob(model=str(ckpt), outdir=out, prune=PruneConfig(**prune_kw),
                    calibration=CalibrationConfig(str(calib), 4, 32, 0), progress=False)
    return refine(job)


@pytest.mark.parametrize(("method", "refinement"), [
    (Method.MAGNITUDE, Refinement.NONE), (Method.WANDA, Refinement.DSNOT), (Method.WANDA, Refinement.EXACT),
    (Method.SPARSEGPT, Refinement.EXACT),
])
def test_owl_keeps_the_model_count_and_varies_layers(tiny, tmp_path: Path, method: Method,
                                                     refinement: Refinement) -> None:
    uniform = _refine(tiny, tmp_path / "u", method=method, refinement=refinement,
                      pattern=SparsityPattern.unstructured(0.6), allocation=UNIFORM)
    owl = _refine(tiny, tmp_path / "o", method=method, refinement=refinement,
                  pattern=SparsityPattern.unstructured(0.6), allocation=OWL)
    per_row_uniform = sum(lin["rows"] * math.floor(lin["cols"] * 0.6) for lin in uniform["linears"])
    assert owl["sparsity"]["pruned_linears_zeros"] == per_row_uniform
    if method is not Method.SPARSEGPT:
        assert uniform["sparsity"]["pruned_linears_zeros"] == per_row_uniform
    layers = [layer["sparsity"] for layer in owl["sparsity"]["per_layer"]]
    assert max(layers) - min(layers) > 0.05
    record = owl["allocation"]
    assert record["kind"] == "owl" and len(record["outlier_ratios"]) == 4
    assert owl["settings"]["allocation"]["kind"] == "owl"
    assert uniform["allocation"] == {"kind": "uniform"}
    for lin in owl["linears"]:  # every Linear prunes the count the allocation gave it, in every row
        layer, name = lin["name"].split(".", 1)
        assert lin["zeros"] == lin["rows"] * record["per_row_counts"][int(layer)][name]


def test_owl_on_nm_stays_uniform_and_says_why(tiny, tmp_path: Path) -> None:
    m = _refine(tiny, tmp_path / "nm", refinement=Refinement.NONE, pattern=SparsityPattern.nm(2, 4), allocation=OWL)
    assert m["allocation"]["kind"] == "uniform" and m["allocation"]["requested"] == "owl"
    assert all(layer["sparsity"] == 0.5 for layer in m["sparsity"]["per_layer"])


def test_owl_streamed_equals_in_memory_and_the_cli_takes_it(tiny, tmp_path: Path) -> None:
    ckpt, calib = tiny
    common = ["--calib", str(calib), "--nsamples", "4", "--seqlen", "32", "--sparsity", "0.6", "--refine", "none",
              "--allocation", "owl", "--owl-spread", "0.1", "-q"]
    assert main(["refine", str(ckpt), str(tmp_path / "mem"), *common]) == 0
    assert main(["refine", str(ckpt), str(tmp_path / "str"), "--stream", *common]) == 0
    mem = json.loads((tmp_path / "mem" / "sparsity.json").read_text())
    streamed = json.loads((tmp_path / "str" / "sparsity.json").read_text())
    assert mem["allocation"] == streamed["allocation"]
    assert mem["allocation"]["spread"] == 0.1
    assert [lin["zeros"] for lin in mem["linears"]] == [lin["zeros"] for lin in streamed["linears"]]

    a, b = checkpoint_tensors(tmp_path / "mem"), checkpoint_tensors(tmp_path / "str")
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    assert main(["refine", str(ckpt), str(tmp_path / "bad"), *common, "--owl-threshold", "0"]) != 0


def test_owl_checkpoint_exports_its_allocation_and_per_layer_sparsity(tiny, tmp_path: Path) -> None:
    import gguf

    from converters.gguf_export import ExportConfig, export_gguf

    manifest = _refine(tiny, tmp_path / "o", refinement=Refinement.NONE, pattern=SparsityPattern.unstructured(0.6),
                       allocation=OWL)
    export_gguf(tmp_path / "o", tmp_path / "o.gguf", ExportConfig(qtype="F16", progress=False))
    fields = gguf.GGUFReader(tmp_path / "o.gguf").fields
    assert fields["dsnot.allocation"].contents() == "owl"
    per_layer = fields["dsnot.sparsity.per_layer"].contents()
    assert per_layer == pytest.approx([layer["sparsity"] for layer in manifest["sparsity"]["per_layer"]])


def test_pipeline_name_lists_the_steps_that_ran() -> None:
    from dsnot_deploy.layerwise.manifest import pipeline_name

    assert pipeline_name({"method": "wanda", "refinement": "exact", "update": "admm",
                          "allocation": {"kind": "owl"}}) == "wanda+exact+admm+owl"
    assert pipeline_name({"method": "sparsegpt", "refinement": "none", "update": "none",
                          "allocation": {"kind": "uniform"}}) == "sparsegpt+none"


def test_auto_allocation_in_the_refine_job(tiny, tmp_path: Path) -> None:
    auto = AllocationConfig(kind=Allocation.AUTO)
    below = _refine(tiny, tmp_path / "b", method=Method.WANDA, refinement=Refinement.NONE, allocation=auto,
                    pattern=SparsityPattern.unstructured(round(OWL_FROM_SPARSITY - 0.1, 2)))
    assert below["allocation"]["kind"] == "uniform" and below["allocation"]["requested"] == "auto"
    assert "auto allocation is OWL from" in below["allocation"]["reason"]
    above = _refine(tiny, tmp_path / "a", method=Method.WANDA, refinement=Refinement.NONE, allocation=auto,
                    pattern=SparsityPattern.unstructured(OWL_FROM_SPARSITY))
    assert above["allocation"]["kind"] == "owl" and above["allocation"]["requested"] == "auto"
    layers = [layer["sparsity"] for layer in above["sparsity"]["per_layer"]]
    assert max(layers) - min(layers) > 0.05
