"""Evaluation in torch and in llama.cpp: perplexity protocols, the llama.cpp loader, child process and runtime, validate, reports."""
