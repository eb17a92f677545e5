"""llama.cpp as the on-device runtime: chunked scoring of a GGUF, and logits in a child process.

:class:`GGUFModel` opens the file through ``llamacpp_loader.open_llama`` and always closes it (use it
as a context manager). :meth:`GGUFModel.iter_chunks` runs non-overlapping chunks of a token stream
and yields, per chunk, the logits of the scored positions only, as llama-perplexity does: the batch
requests outputs only for those positions, so neither the unscored positions' logits nor the logits
of earlier chunks are ever held. :func:`isolated_logits` evaluates ids in a llama.cpp child process.
The GGUF header itself is read by ``converters.gguf_info``.

The scored positions of both protocols (algorithms.md section 5) are those of
``dsnot_deploy.evaluation.perplexity`` (``perplexity_paper`` / ``perplexity_llamacpp``);
:class:`ScoringPlan` states them once for the llama.cpp side and the tests check that both runtimes
agree.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from converters.gguf_info import check_gguf_file, read_gguf_info
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.protocols import LLAMACPP, parse_protocol

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------- scored positions


@dataclass(frozen=True)
class ScoringPlan:
    """Which positions of which chunks are scored (algorithms.md section 5).

    Chunk ``c`` is ``ids[c * ctx : (c + 1) * ctx]``; when ``bos_id`` is not None its first token is
    replaced by ``bos_id`` before it is run (the llama.cpp protocol, when the vocab adds BOS). The
    logits at positions ``first .. ctx - 2`` are scored against the tokens at ``first + 1 .. ctx - 1``
    of the unmodified chunk. ``paper``: ``first = 0``, no replacement (``perplexity_paper``);
    ``llamacpp``: ``first = ctx // 2`` (``perplexity_llamacpp``).
    """

    protocol: str
    ctx: int
    first: int
    bos_id: int | None

    def __post_init__(self) -> None:
        parse_protocol(self.protocol, "a protocol")
        if not 0 <= self.first <= self.ctx - 2:
            raise UserInputError(f"expected 0 <= first <= ctx - 2, found first={self.first}, ctx={self.ctx}")

    @classmethod
    def for_protocol(cls, protocol: str, ctx: int, bos_id: int | None) -> ScoringPlan:
        """The plan of ``protocol`` for chunks of ``ctx`` tokens; ``bos_id`` is used by llamacpp only."""
        if parse_protocol(protocol, "a protocol") == LLAMACPP:
            if ctx < 3:
                raise UserInputError(f"expected ctx >= 3 for the llamacpp protocol, found {ctx}")
            return cls(protocol, ctx, ctx // 2, bos_id)
        if ctx < 2:
            raise UserInputError(f"expected ctx >= 2 for the paper protocol, found {ctx}")
        return cls(protocol, ctx, 0, None)

    @property
    def scored_per_chunk(self) -> int:
        return self.ctx - 1 - self.first

    def n_chunks(self, n_tokens: int, max_chunks: int | None) -> int:
        """Full chunks that are run; UserInputError when the text is shorter than one chunk."""
        available = n_tokens // self.ctx
        if available == 0:
            raise UserInputError(
                f"expected at least one chunk of {self.ctx} tokens, found a text of only {n_tokens} tokens; "
                "pass a longer text or a smaller --ctx"
            )
        if max_chunks is not None and max_chunks < 1:
            raise UserInputError(f"expected max_chunks >= 1, found {max_chunks}")
        return available if max_chunks is None else min(available, max_chunks)

    def chunk(self, ids: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray]:
        """``(tokens to run (ctx,), targets of the scored positions (scored_per_chunk,))`` of chunk ``c``."""
        tokens = np.array(ids[c * self.ctx : (c + 1) * self.ctx], dtype=np.int32)  # (ctx,) a copy
        if tokens.shape[0] != self.ctx:
            raise UserInputError(f"chunk {c} needs {self.ctx} tokens, found {tokens.shape[0]}")
        targets = tokens[self.first + 1 :].copy()  # taken before any BOS replacement
        if self.bos_id is not None:
            tokens[0] = self.bos_id
        return tokens, targets


# --------------------------------------------------------------------------- the runtime


@dataclass
class ChunkLogits:
    """One chunk's output. ``logits`` ``(scored_per_chunk, n_vocab)`` float32 is a read-only view of
    llama.cpp's output buffer, valid until the next chunk of the same model is requested.
    ``seconds``: wall time of the decode of this chunk alone."""

    index: int
    logits: np.ndarray
    targets: np.ndarray
    seconds: float


@dataclass
class GGUFModel:
    """A GGUF opened in llama-cpp-python for chunked scoring; a context manager that always closes.

    ``n_ctx`` is both the context and the batch size, so one chunk is one ``llama_decode`` call
    (llama.cpp splits it into micro-batches of ``n_ubatch``). ``threads`` (default: all CPUs) is
    used for batch decoding. ``gpu_layers``: layers offloaded to a GPU (0 = none, -1 = all; needs a
    llama.cpp build with GPU offload).
    """

    path: Path
    n_ctx: int
    threads: int | None = None
    n_ubatch: int = 512
    gpu_layers: int = 0
    _llm: Any = field(default=None, init=False, repr=False)
    _batch: Any = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = check_gguf_file(self.path)
        if self.n_ctx < 2:
            raise UserInputError(f"expected n_ctx >= 2, found {self.n_ctx}")
        if self.threads is not None and self.threads < 1:
            raise UserInputError(f"expected threads >= 1, found {self.threads}")
        from converters.llamacpp_loader import open_llama

        threads = self.threads or os.cpu_count() or 1
        # logits_all=False: outputs are requested per position in our own batch
        self._llm = open_llama(self.path, n_ctx=self.n_ctx, n_batch=self.n_ctx, n_ubatch=self.n_ubatch,
                               n_threads=threads, logits_all=False, n_gpu_layers=self.gpu_layers)
        logger.info("llama.cpp opened %s (n_ctx %d, %d threads, %d GPU layers)", self.path.name, self.n_ctx, threads,
                    self.gpu_layers)

    # -- lifetime
    def close(self) -> None:
        """Free the batch and the model (idempotent)."""
        if self._batch is not None:
            import llama_cpp

            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._llm is not None:
            self._llm.close()
            self._llm = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> Any:
        if self._llm is None:
            raise RuntimeError(f"{self.path.name} is closed")
        return self._llm

    # -- vocabulary
    def _vocab(self) -> Any:
        import llama_cpp

        return llama_cpp.llama_model_get_vocab(self._open().model)

    @property
    def n_vocab(self) -> int:
        return int(self._open().n_vocab())

    @property
    def adds_bos(self) -> bool:
        """Whether the vocabulary adds BOS when tokenizing (``tokenizer.ggml.add_bos_token``)."""
        import llama_cpp

        return bool(llama_cpp.llama_vocab_get_add_bos(self._vocab()))

    @property
    def bos_id(self) -> int:
        import llama_cpp

        return int(llama_cpp.llama_vocab_bos(self._vocab()))

    def tokenize(self, text: str) -> np.ndarray:
        """``text`` tokenized whole as llama-perplexity does (BOS added if the vocab adds it, special
        tokens not parsed), as int32 ``(n,)``."""
        ids = self._open().tokenize(text.encode("utf-8"), add_bos=True, special=False)
        return np.asarray(ids, dtype=np.int32)

    # -- scoring
    def iter_chunks(self, ids: np.ndarray, plan: ScoringPlan, max_chunks: int | None = None) -> Iterator[ChunkLogits]:
        """Run the chunks of ``ids`` under ``plan`` one at a time and yield each chunk's scored logits.

        Per chunk: the model's memory is cleared, the ``ctx`` tokens are decoded in one batch whose
        output flags are set for positions ``plan.first .. ctx - 2`` only, and the logits of those
        positions are yielded (see :class:`ChunkLogits`; the view is overwritten by the next chunk).
        """
        import llama_cpp

        if plan.ctx != self.n_ctx:
            raise UserInputError(f"expected chunks of the model's n_ctx {self.n_ctx}, found ctx {plan.ctx}")
        ids = np.asarray(ids)
        n_chunks = plan.n_chunks(int(ids.shape[0]), max_chunks)
        if ids.size and (int(ids.max()) >= self.n_vocab or int(ids.min()) < 0):
            raise UserInputError(f"expected token ids in [0, {self.n_vocab}), found {int(ids.min())}..{int(ids.max())}")
        llm = self._open()
        ctx_p = llm.ctx
        n_vocab = self.n_vocab
        token_view, pos_view, out_flags = self._batch_views(plan)
        for c in range(n_chunks):
            tokens, targets = plan.chunk(ids, c)
            token_view[:] = tokens
            t0 = time.perf_counter()
            memory = llama_cpp.llama_get_memory(ctx_p)
            if memory is not None:
                llama_cpp.llama_memory_clear(memory, True)
            rc = llama_cpp.llama_decode(ctx_p, self._batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc} on chunk {c} of {self.path.name}")
            pointer = llama_cpp.llama_get_logits(ctx_p)
            logits = np.ctypeslib.as_array(pointer, shape=(plan.scored_per_chunk, n_vocab))  # (scored, vocab)
            logits.flags.writeable = False
            seconds = time.perf_counter() - t0
            yield ChunkLogits(index=c, logits=logits, targets=targets, seconds=seconds)
        del pos_view, out_flags

    def _batch_views(self, plan: ScoringPlan) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allocate (once) the batch of ``ctx`` tokens of sequence 0 and set positions and output flags."""
        import llama_cpp

        n = plan.ctx
        if self._batch is None:
            self._batch = llama_cpp.llama_batch_init(n, 0, 1)
            for i in range(n):
                self._batch.seq_id[i][0] = 0
        batch = self._batch
        batch.n_tokens = n
        token_view = np.ctypeslib.as_array(batch.token, shape=(n,))
        pos_view = np.ctypeslib.as_array(batch.pos, shape=(n,))
        np.ctypeslib.as_array(batch.n_seq_id, shape=(n,))[:] = 1
        out_flags = np.ctypeslib.as_array(batch.logits, shape=(n,))
        pos_view[:] = np.arange(n, dtype=pos_view.dtype)
        out_flags[:] = 0
        out_flags[plan.first : n - 1] = 1  # outputs only where a prediction is scored
        return token_view, pos_view, out_flags


def logits_fn(llm: Any) -> Any:
    """An open ``llama_cpp.Llama`` (``logits_all=True``) as a ``perplexity.py`` model: ids (1, n) -> logits
    (1, n, vocab), float32, every position kept.  Each call resets the context and evaluates the ids."""
    import torch

    def run(ids: Any) -> Any:
        llm.reset()
        llm.eval(ids.reshape(-1).tolist())
        return torch.from_numpy(np.array(llm.scores[: ids.numel()], dtype=np.float32)).unsqueeze(0)

    return run


def _logits_in_child(reporter: Any, path: str, qtype: str, ids: list[int], n_ctx: int, threads: int | None,
                     extra_buffers: Any) -> np.ndarray:
    from converters.llamacpp_loader import open_llama

    reporter.phase("loading", path, qtype)
    llm = open_llama(path, n_ctx=n_ctx, n_threads=threads, logits_all=True, extra_buffers=extra_buffers)
    try:
        reporter.phase("decoding", path, qtype)
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def isolated_logits(path: str | os.PathLike[str], ids: list[int] | np.ndarray, n_ctx: int | None = None,
                    threads: int | None = None, extra_buffers: Any = None) -> np.ndarray:
    """The logits ``(len(ids), n_vocab)`` float32 of one evaluation of ``ids`` from an empty context,
    computed in a llama.cpp child process (``llamacpp_child``): a native crash raises ``LlamaCppCrash``
    instead of ending the caller. ``extra_buffers``: an ``llamacpp_loader.ExtraBuffers`` (default: the policy)."""
    from dsnot_deploy.evaluation.llamacpp_child import run_isolated

    info = read_gguf_info(path)
    ids = [int(i) for i in ids]
    n_ctx = n_ctx or max(len(ids), 8)
    return run_isolated(_logits_in_child, str(info.path), info.file_type_name, ids, n_ctx, threads, extra_buffers)
