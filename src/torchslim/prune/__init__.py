"""Pruning, one sub-package per engine: `graph/` (structured pruning of any model through its captured
graph: channels, neurons and heads removed physically), `transformer/` (heads, FFN neurons, hidden size
and blocks of encoders and decoder LMs) and `sparsity/` (magnitude, Wanda, SparseGPT, N:M, schedules).
`stage.py` is the `prune` stage that picks among them."""

from torchslim.models.attention import Attention, convert_attention
from torchslim.prune.graph.structured import apply, plan, structured
from torchslim.prune.sparsity import schedule, unstructured

__all__ = ["Attention", "apply", "convert_attention", "plan", "schedule", "structured", "unstructured"]
