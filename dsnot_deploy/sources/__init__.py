"""Model and text I/O: model specs (Hub id, local dir, GGUF, alias), loading and checkpoints; calibration and evaluation text."""
