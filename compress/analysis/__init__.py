"""Analysis that never changes the model: statistics, MACs, effective sparsity."""
