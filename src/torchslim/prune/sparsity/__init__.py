"""Sparsity: magnitude pruning with schedules (`unstructured`, `schedule`) and one-shot Wanda, SparseGPT
and N:M for language models (`oneshot`). Sparse storage lives in `torchslim.models.sparse`."""
