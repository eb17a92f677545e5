"""Quantization onto GGUF block lattices inside refinement (issue 15)."""
