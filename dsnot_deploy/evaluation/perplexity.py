"""Perplexity under the two protocols of algorithms.md section 5 (never mixed).

Both take a ``model`` that maps input ids ``(1, n)`` to logits ``(1, n, vocab)``: a plain callable
returning a tensor, or a Hugging Face causal LM (its output's ``.logits`` is used). Logits come out
in the model's dtype; the log-softmax is taken in float64 and NLL is summed in float64 over all
scored tokens before one division at the end.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from dsnot_deploy.errors import UserInputError
from dsnot_deploy.progress import Progress, track
from dsnot_deploy.protocols import LLAMACPP, PAPER

logger = logging.getLogger(__name__)

ModelFn = Callable[[torch.Tensor], Any]

# Rows of logits converted to float64 at once: bounds the float64 copy to ~256 MiB whatever the
# vocabulary (2048 x 128256 float64 would be 2 GiB).
_MAX_F64_ELEMENTS = 1 << 25


@dataclass(frozen=True)
class PerplexityResult:
    """One perplexity measurement.

    ``ppl = exp(nll_sum / n_scored)``; ``n_chunks`` chunks of ``ctx`` tokens were run through the
    model; ``per_chunk_ppl[c]`` is the perplexity of chunk ``c`` alone; ``tokens_per_second`` counts
    the tokens fed to the model (``n_chunks * ctx``), not only the scored ones.
    """

    protocol: str
    ppl: float
    nll_sum: float
    n_scored: int
    n_chunks: int
    ctx: int
    per_chunk_ppl: tuple[float, ...]
    seconds: float
    tokens_per_second: float


def perplexity_paper(
    model: ModelFn,
    ids: torch.Tensor,
    seqlen: int,
    max_chunks: int | None = None,
    device: str | torch.device = "cpu",
    progress: Progress = True,
) -> PerplexityResult:
    """Paper protocol (Wanda / SparseGPT / DSnoT): non-overlapping chunks of ``seqlen`` tokens.

    ``ids`` is the whole evaluation text tokenized once (1-D). The partial tail after the last full
    chunk is dropped. Inside each chunk every position that has a next token is scored: the logits at
    position ``t`` predict token ``t + 1``, ``t = 0 .. seqlen - 2``, so ``seqlen - 1`` tokens per chunk
    (the first token of a chunk has no prefix within the chunk and is never predicted).
    ``ppl = exp(sum NLL / n_scored)`` with ``n_scored = n_chunks * (seqlen - 1)``. This equals the
    reference code's ``exp(sum_c(mean_loss_c * seqlen) / (n_chunks * seqlen))``, because every chunk
    has the same count. At most ``max_chunks`` chunks are scored if given.
    """
    if seqlen < 2:
        raise UserInputError(f"expected seqlen >= 2 (one prediction needs two tokens), found {seqlen}")
    return _run_chunks(PAPER, model, ids, seqlen, first=0, bos_id=None, max_chunks=max_chunks, device=device,
                       progress=progress)


def perplexity_llamacpp(
    model: ModelFn,
    ids: torch.Tensor,
    n_ctx: int,
    bos_id: int | None,
    max_chunks: int | None = None,
    device: str | torch.device = "cpu",
    progress: Progress = True,
) -> PerplexityResult:
    """llama.cpp protocol (``llama-perplexity``): non-overlapping chunks of ``n_ctx`` tokens.

    ``ids`` is the raw file text tokenized whole (with BOS if the vocab adds one); the partial tail is
    dropped. If ``bos_id`` is not None the first token of every chunk is replaced by ``bos_id`` before
    the chunk is run. Only the second half is scored: the logits at positions
    ``first = n_ctx // 2 .. n_ctx - 2`` predict the next token, so ``n_ctx - 1 - n_ctx // 2`` tokens
    per chunk. ``llama-perplexity`` itself refuses texts shorter than ``2 * n_ctx`` tokens; here one
    chunk is enough.
    """
    if n_ctx < 3:
        raise UserInputError(f"expected n_ctx >= 3 (the scored second half must hold a prediction), found {n_ctx}")
    return _run_chunks(LLAMACPP, model, ids, n_ctx, first=n_ctx // 2, bos_id=bos_id, max_chunks=max_chunks,
                       device=device, progress=progress)


def _run_chunks(
    protocol: str,
    model: ModelFn,
    ids: torch.Tensor,
    ctx: int,
    *,
    first: int,
    bos_id: int | None,
    max_chunks: int | None,
    device: str | torch.device,
    progress: Progress,
) -> PerplexityResult:
    """Score positions ``first .. ctx - 2`` (predicting ``t + 1``) of every full chunk of ``ctx``."""
    flat = _as_flat_ids(ids)
    available = flat.numel() // ctx
    if available == 0:
        raise UserInputError(f"text has {flat.numel()} tokens; one chunk needs {ctx}")
    if max_chunks is not None and max_chunks < 1:
        raise UserInputError(f"expected max_chunks >= 1 or None, found {max_chunks}")
    n_chunks = available if max_chunks is None else min(available, max_chunks)
    per_chunk_scored = ctx - 1 - first
    logger.info(
        "perplexity (%s): %d chunks of %d tokens (%d available, %d tail tokens dropped), %d scored per chunk",
        protocol,
        n_chunks,
        ctx,
        available,
        flat.numel() - available * ctx,
        per_chunk_scored,
    )
    nll_sum = 0.0
    per_chunk: list[float] = []
    start_time = time.perf_counter()
    with torch.no_grad():
        for c in track(progress, range(n_chunks), f"ppl ({protocol})"):
            chunk = flat[c * ctx : (c + 1) * ctx].clone()  # (ctx,)
            targets = chunk[first + 1 :]  # (ctx - 1 - first,) taken before any BOS replacement
            if bos_id is not None:
                chunk[0] = bos_id
            logits = _logits(model, chunk.unsqueeze(0).to(device), ctx)  # (1, ctx, vocab)
            chunk_nll = _nll_sum(logits[0, first : ctx - 1], targets.to(logits.device))
            nll_sum += chunk_nll
            per_chunk.append(math.exp(chunk_nll / per_chunk_scored))
    seconds = time.perf_counter() - start_time
    n_scored = n_chunks * per_chunk_scored
    ppl = math.exp(nll_sum / n_scored)
    fed = n_chunks * ctx
    result = PerplexityResult(
        protocol=protocol,
        ppl=ppl,
        nll_sum=nll_sum,
        n_scored=n_scored,
        n_chunks=n_chunks,
        ctx=ctx,
        per_chunk_ppl=tuple(per_chunk),
        seconds=seconds,
        tokens_per_second=fed / seconds if seconds > 0 else math.inf,
    )
    logger.info("perplexity (%s): %.4f over %d scored tokens in %.1f s", protocol, ppl, n_scored, seconds)
    return result


def _as_flat_ids(ids: torch.Tensor) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor):
        raise UserInputError(f"expected token ids as a torch tensor, found {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise UserInputError(f"expected token ids of shape (n,) or (1, n), found {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise UserInputError(f"expected integer token ids, found dtype {ids.dtype}")
    return ids.to(torch.long).cpu()


def _logits(model: ModelFn, chunk: torch.Tensor, ctx: int) -> torch.Tensor:
    out = model(chunk)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or tuple(logits.shape[:2]) != (1, ctx):
        found = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise UserInputError(f"expected the model to return logits of shape (1, {ctx}, vocab), found {found}")
    return logits


def _nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Sum over rows of ``-log softmax(logits[r])[targets[r]]``, in float64, in row blocks."""
    rows, vocab = logits.shape  # (scored, vocab)
    if int(targets.max()) >= vocab or int(targets.min()) < 0:
        raise UserInputError(
            f"expected token ids in [0, {vocab}) for a model with {vocab} logits, "
            f"found ids from {int(targets.min())} to {int(targets.max())}"
        )
    block = max(1, _MAX_F64_ELEMENTS // vocab)
    total = torch.zeros((), dtype=torch.float64, device=logits.device)
    for r in range(0, rows, block):
        part = logits[r : r + block].to(torch.float64)  # (block, vocab)
        log_probs = torch.log_softmax(part, dim=-1)
        total -= log_probs.gather(1, targets[r : r + block, None]).sum()
    return float(total)
