"""The size/quality frontier (`dsnot-deploy frontier`): dense and sparse GGUFs of one model at many
types, their pack sizes and llama.cpp perplexities, and the Pareto fronts by GGUF and by pack size.
``plan`` (the configurations), ``run`` (measuring), ``pareto`` (pure fronts), ``report`` (md/json/png)."""
