"""Any model spec as a local Hugging Face checkpoint directory, for the steps that read files (export)."""

from __future__ import annotations

from pathlib import Path


def save_as_checkpoint(spec: str, outdir: Path) -> Path:
    """Load ``spec`` (an alias or GGUF is dequantized, a Hub id fetched) and save it as a plain HF
    checkpoint in ``outdir`` (written atomically); return ``outdir``."""
    from dsnot_deploy.sources.checkpoint_io import save_checkpoint
    from dsnot_deploy.sources.models import load_model

    loaded = load_model(spec)
    save_checkpoint(loaded.model, loaded.tokenizer, outdir)
    return outdir
