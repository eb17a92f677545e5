"""The `eval` job: perplexity of a model (torch) under one protocol of algorithms.md section 5."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dsnot_deploy import __version__
from dsnot_deploy.atomic import atomic_write_bytes
from dsnot_deploy.errors import UserInputError
from dsnot_deploy.evaluation.perplexity import perplexity_llamacpp, perplexity_paper
from dsnot_deploy.progress import Progress
from dsnot_deploy.protocols import PAPER, parse_protocol
from dsnot_deploy.sources.models import DTYPES, load_model
from dsnot_deploy.sources.textdata import load_text_source, tokenize_eval

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class EvalJob:
    model: str
    text: str = "pydoc"
    split: str | None = None
    protocol: str = PAPER
    seqlen: int = 2048
    max_chunks: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    progress: Progress = True
    json_path: Path | None = None

    def __post_init__(self) -> None:
        parse_protocol(self.protocol)
        if self.max_chunks is not None and self.max_chunks < 1:
            raise UserInputError(f"max_chunks must be >= 1; got {self.max_chunks}")
        if self.json_path is not None and not Path(self.json_path).absolute().parent.is_dir():
            raise UserInputError(f"output folder {Path(self.json_path).absolute().parent} does not exist")


def perplexity_of(model: Any, tokenizer: Any, text: str, protocol: str, seqlen: int,
                  max_chunks: int | None, device: str, progress: Progress):
    """Tokenize `text` once and score it with `protocol` (shared by eval and the benchmarks)."""
    ids = tokenize_eval(tokenizer, text)
    if protocol == PAPER:
        return perplexity_paper(model, ids, seqlen, max_chunks=max_chunks, device=device, progress=progress)
    # llama.cpp replaces each chunk's first token by BOS only when the vocab adds one
    bos = tokenizer.bos_token_id
    bos = bos if bos is not None and ids.numel() and int(ids[0]) == bos else None
    return perplexity_llamacpp(model, ids, seqlen, bos, max_chunks=max_chunks, device=device, progress=progress)


def evaluate(job: EvalJob) -> dict[str, Any]:
    source = load_text_source(job.text, job.split)
    loaded = load_model(job.model, dtype=DTYPES[job.dtype], device=job.device)
    text = source.eval_text(job.protocol)
    result = perplexity_of(loaded.model, loaded.tokenizer, text, job.protocol, job.seqlen, job.max_chunks,
                           job.device, job.progress)
    report = {**asdict(result), "model": job.model, "text": job.text, "split": job.split,
              "dtype": job.dtype, "tool_version": __version__}
    if job.json_path is not None:
        atomic_write_bytes(Path(job.json_path), (json.dumps(report, indent=2) + "\n").encode())
    return report
