"""dsnot-deploy: training-free sparsification of decoder LLMs for llama.cpp devices."""

__version__ = "0.1.0"
