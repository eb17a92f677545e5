"""Perplexity protocols on fake models whose answers can be checked by hand."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.evaluation import perplexity as ppl_mod
from dsnot_deploy.evaluation.perplexity import (
    PerplexityResult,
    perplexity_llamacpp,
    perplexity_paper,
)


class Recorder:
    """A model that records every input it sees and returns ``logits_fn(ids)`` (ids: (1, n))."""

    def __init__(self, logits_fn):
        self.logits_fn = logits_fn
        self.inputs: list[torch.Tensor] = []

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        self.inputs.append(ids.clone())
        return self.logits_fn(ids)


def uniform(vocab: int):
    return Recorder(lambda ids: torch.zeros(1, ids.shape[1], vocab))


def position_probe():
    """Vocab 2, all targets 0: the logits at position t are [0, t], so NLL_t = log(1 + e^t).
    The total NLL then says exactly which positions were scored."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        logits = torch.zeros(1, n, 2, dtype=torch.float64)
        logits[0, :, 1] = torch.arange(n, dtype=torch.float64)
        return logits

    return Recorder(fn)


def probe_nll(positions) -> float:
    return sum(math.log1p(math.exp(t)) for t in positions)


# ----------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("vocab", [2, 7, 320])
def test_uniform_model_gives_vocab_size_for_both_protocols(vocab):
    ids = torch.randint(0, vocab, (100,), generator=torch.Generator().manual_seed(0))
    paper = perplexity_paper(uniform(vocab), ids, seqlen=16, progress=False)
    llama = perplexity_llamacpp(uniform(vocab), ids, n_ctx=16, bos_id=0, progress=False)
    for result in (paper, llama):
        assert isinstance(result, PerplexityResult)
        assert result.ppl == pytest.approx(vocab, rel=1e-12)
        assert result.nll_sum == pytest.approx(result.n_scored * math.log(vocab), rel=1e-12)
        assert all(p == pytest.approx(vocab, rel=1e-12) for p in result.per_chunk_ppl)
    assert paper.protocol == "paper" and llama.protocol == "llamacpp"


# ----------------------------------------------------------------------------- known probabilities


def test_paper_known_probabilities_hand_computed():
    # p(0) = 3/4, p(1) = 1/4 at every position
    model = Recorder(lambda ids: torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(1, ids.shape[1], 2))
    ids = torch.tensor([1, 0, 1, 0, 0, 0, 0, 1])  # two chunks of 4: targets [0,1,0] and [0,0,1]
    result = perplexity_paper(model, ids, seqlen=4, progress=False)
    nll = 4 * -math.log(3 / 4) + 2 * -math.log(1 / 4)
    assert result.n_scored == 6 and result.n_chunks == 2 and result.ctx == 4
    assert result.nll_sum == pytest.approx(nll, rel=1e-12)
    assert result.ppl == pytest.approx((4 / 3) ** (4 / 6) * 4 ** (2 / 6), rel=1e-12)
    chunk_ppl = (4 / 3) ** (2 / 3) * 4 ** (1 / 3)
    assert result.per_chunk_ppl == pytest.approx((chunk_ppl, chunk_ppl), rel=1e-12)


def test_llamacpp_known_probabilities_hand_computed():
    model = Recorder(lambda ids: torch.tensor([math.log(3.0), 0.0], dtype=torch.float64).expand(1, ids.shape[1], 2))
    # n_ctx 6: positions 3, 4 scored, targets ids[4], ids[5] per chunk
    ids = torch.tensor([0, 0, 0, 0, 1, 1, 0, 1, 1, 1, 0, 0])
    result = perplexity_llamacpp(model, ids, n_ctx=6, bos_id=None, progress=False)
    assert result.n_scored == 4
    assert result.nll_sum == pytest.approx(2 * -math.log(1 / 4) + 2 * -math.log(3 / 4), rel=1e-12)
    assert result.per_chunk_ppl == pytest.approx((4.0, 4 / 3), rel=1e-12)
    # the total is the geometric mean of equal-sized chunks
    assert result.ppl == pytest.approx(math.sqrt(4.0 * 4 / 3), rel=1e-12)


def test_target_is_the_next_token_not_the_current_one():
    vocab = 8

    def next_token_model(ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((1, ids.shape[1], vocab), -50.0)
        logits[0, torch.arange(ids.shape[1]), (ids[0] + 1) % vocab] = 50.0
        return logits

    ids = torch.arange(40) % vocab
    assert perplexity_paper(next_token_model, ids, seqlen=10, progress=False).ppl == pytest.approx(1.0, abs=1e-9)
    assert perplexity_llamacpp(next_token_model, ids, 10, None, progress=False).ppl == pytest.approx(1.0, abs=1e-9)


# ----------------------------------------------------------------------------- scored positions


@pytest.mark.parametrize("n_ctx", [3, 4, 5, 8, 9])
def test_llamacpp_scores_positions_half_to_n_ctx_minus_2(n_ctx):
    model = position_probe()
    ids = torch.zeros(3 * n_ctx + 1, dtype=torch.long)
    result = perplexity_llamacpp(model, ids, n_ctx=n_ctx, bos_id=1, progress=False)
    positions = range(n_ctx // 2, n_ctx - 1)
    assert result.n_chunks == 3
    assert result.n_scored == 3 * len(positions)
    assert result.nll_sum == pytest.approx(3 * probe_nll(positions), rel=1e-12)


def test_paper_scores_every_position_with_a_next_token():
    model = position_probe()
    ids = torch.zeros(16, dtype=torch.long)
    result = perplexity_paper(model, ids, seqlen=8, progress=False)
    assert result.n_scored == 2 * 7
    assert result.nll_sum == pytest.approx(2 * probe_nll(range(0, 7)), rel=1e-12)


# ----------------------------------------------------------------------------- BOS, chunks, tail


def test_llamacpp_replaces_first_token_of_every_chunk_with_bos():
    model = uniform(10)
    ids = torch.arange(1, 10).repeat(3)[:25]  # 25 tokens, none is 0
    perplexity_llamacpp(model, ids, n_ctx=8, bos_id=0, progress=False)
    assert len(model.inputs) == 3
    for c, seen in enumerate(model.inputs):
        expected = ids[c * 8 : (c + 1) * 8].clone()
        expected[0] = 0
        assert seen.shape == (1, 8)
        assert torch.equal(seen[0], expected)


def test_llamacpp_without_bos_and_paper_leave_chunks_unchanged():
    ids = torch.arange(1, 10).repeat(3)[:25]
    for run in (
        lambda m: perplexity_llamacpp(m, ids, n_ctx=8, bos_id=None, progress=False),
        lambda m: perplexity_paper(m, ids, seqlen=8, progress=False),
    ):
        model = uniform(10)
        run(model)
        assert [list(x[0]) for x in model.inputs] == [list(ids[c * 8 : (c + 1) * 8]) for c in range(3)]


def test_bos_replacement_changes_the_score_a_model_gives():
    # a model that is sure of every target only when the chunk starts with BOS (id 0)
    def fn(ids: torch.Tensor) -> torch.Tensor:
        n = ids.shape[1]
        sure = bool(ids[0, 0] == 0)
        return torch.tensor([20.0 if sure else 0.0, 0.0]).expand(1, n, 2)

    ids = torch.tensor([1, 0, 0, 0] * 2)
    with_bos = perplexity_llamacpp(fn, ids, n_ctx=4, bos_id=0, progress=False)
    without = perplexity_llamacpp(fn, ids, n_ctx=4, bos_id=None, progress=False)
    assert with_bos.ppl == pytest.approx(1.0, abs=1e-6)
    assert without.ppl == pytest.approx(2.0, rel=1e-12)


def test_tail_is_dropped_and_max_chunks_limits():
    ids = torch.arange(1, 24)  # 23 tokens
    model = uniform(30)
    result = perplexity_paper(model, ids, seqlen=5, progress=False)
    assert result.n_chunks == 4 and result.n_scored == 16 and len(result.per_chunk_ppl) == 4
    seen = torch.cat([x[0] for x in model.inputs])
    assert torch.equal(seen, ids[:20])  # tokens 21..23 never reach the model

    model = uniform(30)
    limited = perplexity_llamacpp(model, ids, n_ctx=5, bos_id=None, max_chunks=2, progress=False)
    assert limited.n_chunks == 2 and limited.n_scored == 2 * 2 and len(model.inputs) == 2
    assert perplexity_paper(uniform(30), ids, seqlen=5, max_chunks=99, progress=False).n_chunks == 4


def test_exactly_one_chunk_is_enough():
    result = perplexity_paper(uniform(5), torch.zeros(6, dtype=torch.long), seqlen=6, progress=False)
    assert result.n_chunks == 1 and result.n_scored == 5


def test_too_short_text_raises_with_counts():
    with pytest.raises(UserInputError, match="text has 7 tokens; one chunk needs 8"):
        perplexity_paper(uniform(5), torch.zeros(7, dtype=torch.long), seqlen=8, progress=False)
    with pytest.raises(UserInputError, match="text has 0 tokens; one chunk needs 4"):
        perplexity_llamacpp(uniform(5), torch.zeros(0, dtype=torch.long), 4, 0, progress=False)


@pytest.mark.parametrize(
    "call",
    [
        lambda m, ids: perplexity_paper(m, ids, seqlen=1, progress=False),
        lambda m, ids: perplexity_llamacpp(m, ids, n_ctx=2, bos_id=None, progress=False),
        lambda m, ids: perplexity_paper(m, ids, seqlen=4, max_chunks=0, progress=False),
        lambda m, ids: perplexity_paper(m, ids.float(), seqlen=4, progress=False),
        lambda m, ids: perplexity_paper(m, ids.view(2, 5), seqlen=4, progress=False),
        lambda m, ids: perplexity_paper(m, ids + 100, seqlen=4, progress=False),
    ],
)
def test_bad_arguments_raise_user_input_error(call):
    with pytest.raises(UserInputError):
        call(uniform(5), torch.zeros(10, dtype=torch.long))


def test_wrong_logits_shape_raises():
    with pytest.raises(UserInputError, match=r"logits of shape \(1, 4, vocab\)"):
        perplexity_paper(lambda ids: torch.zeros(ids.shape[1], 5), torch.zeros(8, dtype=torch.long), 4, progress=False)


# ----------------------------------------------------------------------------- inputs and outputs


def test_accepts_hf_style_output_and_batched_ids():
    model = lambda ids: SimpleNamespace(logits=torch.zeros(1, ids.shape[1], 9))  # noqa: E731
    result = perplexity_paper(model, torch.zeros(1, 12, dtype=torch.long), seqlen=6, progress=False)
    assert result.ppl == pytest.approx(9.0, rel=1e-12)
    assert result.seconds >= 0 and result.tokens_per_second > 0


def test_low_precision_logits_are_scored_in_float64():
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(64, 50, generator=gen)
    ids = torch.randint(0, 50, (64,), generator=gen)
    ref = perplexity_paper(lambda x: table[: x.shape[1]].unsqueeze(0).double(), ids, 32, progress=False)
    for dtype in (torch.float16, torch.bfloat16):
        low = perplexity_paper(lambda x, d=dtype: table[: x.shape[1]].unsqueeze(0).to(d), ids, 32, progress=False)
        assert low.ppl == pytest.approx(ref.ppl, rel=2e-2)


def test_row_blocks_do_not_change_the_sum(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    table = torch.randn(40, 11, generator=gen)
    ids = torch.randint(0, 11, (40,), generator=gen)
    model = lambda x: table[: x.shape[1]].unsqueeze(0)  # noqa: E731
    whole = perplexity_llamacpp(model, ids, 20, None, progress=False)
    monkeypatch.setattr(ppl_mod, "_MAX_F64_ELEMENTS", 22)  # 2 rows per block
    blocked = perplexity_llamacpp(model, ids, 20, None, progress=False)
    assert blocked.nll_sum == pytest.approx(whole.nll_sum, rel=1e-13)


def test_paper_matches_reference_cross_entropy_on_a_tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 3 * 16 + 5))
    result = perplexity_paper(model, ids, seqlen=16, progress=False)
    # the Wanda/SparseGPT way: mean cross-entropy per chunk, times seqlen, over nsamples * seqlen
    losses = []
    with torch.no_grad():
        for c in range(3):
            chunk = ids[:, c * 16 : (c + 1) * 16]
            logits = model(chunk).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1].double(), chunk[0, 1:])
            losses.append(float(loss) * 16)
    assert result.ppl == pytest.approx(math.exp(sum(losses) / (3 * 16)), rel=1e-9)
