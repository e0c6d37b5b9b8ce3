"""Attention written for the exported decoder: grouped-query attention without copying the cache.

Hugging Face's `sdpa` and `eager` attention repeat every key/value head for its query group
(`repeat_kv`, an Expand of the whole cache per layer and decoding step) and, traced by torch.export,
lower the boolean mask to Where/IsNaN nodes in every layer. `grouped_attention` computes the same
softmax(q·kᵀ·scale + mask)·v with the query heads folded onto their key/value head, (batch, kv heads,
group × sequence, head size), so the cache is read in place, and takes the float additive mask that
Hugging Face builds once per forward (`eager_mask`). What it saves per decoding step is measured
side by side against the plain export by `bench/llm_export.py` (numbers in the README).

`exporting_attention(lm)` switches a model to it for the duration of an export and restores the
implementation it had. Models whose attention does not go through Hugging Face's attention interface
are left as they are; calls with arguments this function does not model (attention sinks, position
biases) go to Hugging Face's `sdpa` implementation."""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

NAME = "torchslim_grouped"


def grouped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query (batch, heads, sequence, size), key/value (batch, kv heads, total, size), mask additive
    (batch, 1, sequence, total) → (batch, sequence, heads, size), as Hugging Face's attention functions."""
    if kwargs.get("s_aux") is not None or kwargs.get("position_bias") is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    batch, heads, length, size = query.shape
    kv_heads, total = key.shape[1], key.shape[2]
    group = heads // kv_heads
    scaling = size**-0.5 if scaling is None else scaling
    folded = (query * scaling).reshape(batch, kv_heads, group * length, size)
    weights = torch.matmul(folded, key.transpose(2, 3))
    if softcap is not None:
        weights = torch.tanh(weights / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attention_mask = torch.where(attention_mask, 0.0, torch.finfo(query.dtype).min).to(query.dtype)
        weights = (weights.reshape(batch, kv_heads, group, length, total) + attention_mask[:, :, None]).reshape(
            batch, kv_heads, group * length, total
        )
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).reshape(batch, heads, length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:  # an older transformers: the model keeps its own attention
        return False
    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)
    return True


@contextmanager
def exporting_attention(lm: nn.Module):
    """`lm` (and every sub-model's config) set to `grouped_attention` inside the block, restored after."""
    configs = {
        id(c): c
        for m in lm.modules()
        if (c := getattr(m, "config", None)) is not None
        and getattr(c, "_attn_implementation", None) in ("sdpa", "eager")
    }
    if not configs or not _register():
        yield lm
        return
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = NAME
        yield lm
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]
