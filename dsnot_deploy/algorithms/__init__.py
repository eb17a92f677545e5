"""Pure math: statistics, masks, SparseGPT, DSnoT, the exact refinement, pruning configs."""
