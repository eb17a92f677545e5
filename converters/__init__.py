"""File-format converters (GGUF, compact sparse packs). They read files on disk only."""
