"""The layer-sequential runner: calibration capture, per-layer driver, streaming, resume, memory estimate, the refine job and its manifest."""
