"""Pruning: structured (channels, neurons, heads removed physically), unstructured, and schedules."""

from torchslim.prune.attention import Attention, convert_attention
from torchslim.prune.structured import apply, plan, structured

__all__ = ["Attention", "apply", "convert_attention", "plan", "structured"]
