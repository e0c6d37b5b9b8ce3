"""Attention written for the exported decoder: grouped-query attention without copying the cache.

Hugging Face's `sdpa` and `eager` attention repeat every key/value head for its query group
(`repeat_kv`, an Expand of the whole cache per layer and decoding step) and, traced by torch.export,
lower the boolean mask to Where/IsNaN nodes in every layer. `grouped_attention` computes the same
softmax(q·kᵀ·scale + mask)·v with the query heads folded onto their key/value head, (batch, kv heads,
group × sequence, head size), so the cache is read in place, and takes the float additive mask that
Hugging Face builds once per forward (`eager_mask`). What it saves per decoding step is measured
side by side against the plain export by `bench/llm_export.py` (numbers in the README).

`fused_attention` (`export_decoder(fused=True)`) goes one step further, to ONNX Runtime's own kernel:
the layer's new keys and values, the cache and the additive mask go to one `com.microsoft.GroupQueryAttention` node per
layer (traced as the `torchslim::group_query_attention` operator, written to ONNX by
`onnx_translations`), which appends to the cache and attends in one kernel — no Concat of the cache, no
Transpose/MatMul/Softmax chain. It needs the cache split into past and new (`SplitCache`, which the
exported decoder passes) and reads the mask as an attention bias, so padding and sliding windows keep
Hugging Face's meaning. ONNX Runtime's kernel refuses one shape: several sequences of more than one
token each *onto* a non-empty cache (batched chunked prefill); the grouped form serves that.

`exporting_attention(lm, fused)` switches a model to one of them for the duration of an export and
restores the implementation it had. Models whose attention does not go through Hugging Face's attention
interface are left as they are; calls with arguments these functions do not model (attention sinks,
position biases) go to Hugging Face's `sdpa` implementation (grouped) or fail the fused export (which
then falls back to the grouped one)."""

from __future__ import annotations

import contextlib
import functools
from contextlib import contextmanager

import torch
from torch import nn

from torchslim.errors import ExportError

NAME = "torchslim_grouped"
FUSED = "torchslim_fused"


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An attention mask as the scores' addend: a boolean one (True: attend) becomes 0 / the dtype's
    lowest value; an additive one is returned as it is."""
    if mask.dtype != torch.bool:
        return mask
    return torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype)


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
        attention_mask = additive(attention_mask, query.dtype)
        weights = (weights.reshape(batch, kv_heads, group, length, total) + attention_mask[:, :, None]).reshape(
            batch, kv_heads, group * length, total
        )
    weights = torch.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).reshape(batch, heads, length, value.shape[-1])
    return out.transpose(1, 2).contiguous(), None


@torch.library.custom_op("torchslim::group_query_attention", mutates_args=())
def group_query_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    past_key: torch.Tensor,
    past_value: torch.Tensor,
    bias: torch.Tensor | None,
    num_heads: int,
    kv_heads: int,
    scale: float,
    softcap: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX Runtime's GroupQueryAttention in PyTorch: query (batch, sequence, heads × size), key/value
    (batch, sequence, kv heads × size), past key/value (batch, kv heads, past, size), bias additive
    (batch or 1, 1, sequence, past + sequence) or None → (output (batch, sequence, heads × size),
    present key, present value (batch, kv heads, past + sequence, size)). Causal within the total
    sequence, then the bias; `softcap` > 0 caps the scores with tanh."""
    batch, length, _ = query.shape
    size = past_key.shape[-1]
    keys = torch.cat([past_key, key.reshape(batch, length, kv_heads, size).transpose(1, 2)], 2)
    values = torch.cat([past_value, value.reshape(batch, length, kv_heads, size).transpose(1, 2)], 2)
    total, group = keys.shape[2], num_heads // kv_heads
    folded = (query.reshape(batch, length, num_heads, size).transpose(1, 2) * scale).reshape(
        batch, kv_heads, group * length, size
    )
    scores = torch.matmul(folded, keys.transpose(2, 3)).reshape(batch, kv_heads, group, length, total)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    seen = (
        torch.arange(total, device=query.device)[None, :]
        <= (total - length + torch.arange(length, device=query.device))[:, None]
    )
    scores = scores.masked_fill(~seen, torch.finfo(scores.dtype).min)
    if bias is not None:
        scores = scores + bias[:, :, None]
    weights = torch.softmax(scores.reshape(batch, kv_heads, group * length, total), dim=-1, dtype=torch.float32)
    out = torch.matmul(weights.to(values.dtype), values).reshape(batch, num_heads, length, size)
    return out.transpose(1, 2).reshape(batch, length, num_heads * size), keys, values


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, bias, num_heads, kv_heads, scale, softcap):
    batch, length, _ = query.shape
    shape = (batch, kv_heads, past_key.shape[2] + length, past_key.shape[3])
    return query.new_empty(query.shape), past_key.new_empty(shape), past_value.new_empty(shape)


@functools.cache
def onnx_translations() -> dict:
    """torch.onnx's `custom_translation_table` for the fused form: the operator above as one
    com.microsoft GroupQueryAttention node (ONNX Runtime's contrib operator; onnx itself has no schema
    for it, so one is declared here with the inputs and attributes this export uses)."""
    import onnx
    import onnxscript
    from onnx.defs import OpSchema
    from onnxscript import opset18 as op

    param, option = OpSchema.FormalParameter, OpSchema.FormalParameterOption
    names = ["query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache"]
    names += ["sin_cache", "position_ids", "attention_bias"]
    kinds = {"seqlens_k": "M", "total_sequence_length": "M", "position_ids": "tensor(int64)"}
    required = ("query", "seqlens_k", "total_sequence_length")
    schema = OpSchema(
        "GroupQueryAttention",
        "com.microsoft",
        1,
        inputs=[
            param(n, kinds.get(n, "T"), param_option=option.Single if n in required else option.Optional) for n in names
        ],
        outputs=[param("output", "T"), param("present_key", "T"), param("present_value", "T")],
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], ""),
            ("M", ["tensor(int32)"], ""),
        ],
        attributes=[
            OpSchema.Attribute(n, kind, "")
            for n, kind in (
                ("num_heads", OpSchema.AttrType.INT),
                ("kv_num_heads", OpSchema.AttrType.INT),
                ("scale", OpSchema.AttrType.FLOAT),
                ("softcap", OpSchema.AttrType.FLOAT),
            )
        ],
    )
    gqa = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "GroupQueryAttention", schema)

    def translate(query, key, value, past_key, past_value, bias, num_heads, kv_heads, scale, softcap):
        # the total length from the mask every layer shares (one computation for the graph) where given
        if bias is not None:
            total = op.Shape(bias, start=3, end=4)
        else:
            total = op.Add(op.Shape(past_key, start=2, end=3), op.Shape(query, start=1, end=2))
        zeros = op.ConstantOfShape(op.Shape(query, start=0, end=1), value=onnx.helper.make_tensor("", 7, [1], [0]))
        last = op.Add(zeros, op.Sub(total, op.Constant(value_ints=[1])))  # per sequence: every position valid
        lengths = (op.Cast(last, to=6), op.Cast(op.Squeeze(total), to=6))  # int32, as the kernel reads them
        return gqa(
            query, key, value, past_key, past_value, *lengths, None, None, None, bias,
            num_heads=num_heads, kv_num_heads=kv_heads, scale=scale, softcap=softcap,
        )  # fmt: skip

    return {torch.ops.torchslim.group_query_attention.default: translate}


class SplitCache:
    """Mix-in for a Hugging Face cache: `update` keeps the layer's past beside this call's keys and values
    and returns only the new ones, for `fused_attention` to hand both to the fused kernel; the kernel's
    present cache comes back in `presents` (layer -> (keys, values))."""

    pending: tuple | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        self.pending = (layer_idx, layer.keys, layer.values)
        return key_states, value_states


_ACTIVE: list = []  # the SplitCache of the forward being traced (a stack: one at a time in practice)


@contextlib.contextmanager
def split_cache(cache):
    """`cache` (a SplitCache) is what `fused_attention` reads within the block; its `presents` start empty."""
    cache.presents, cache.pending = {}, None
    _ACTIVE.append(cache)
    try:
        yield cache
    finally:
        _ACTIVE.remove(cache)


def fused_attention(
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
    """Hugging Face's attention interface over `group_query_attention`: query (batch, heads, sequence,
    size), this call's key/value (batch, kv heads, sequence, size) with the past held by the active
    SplitCache, the mask additive or boolean (batch, 1, sequence, total) → (batch, sequence, heads, size)."""
    cache = _ACTIVE[-1] if _ACTIVE else None
    unmodelled = [k for k in ("s_aux", "position_bias") if kwargs.get(k) is not None]
    size = query.shape[-1]
    why = (
        f"it passes {', '.join(unmodelled)}"
        if unmodelled
        else "no split key/value cache reached it"
        if cache is None or cache.pending is None
        else "its query, key and value head sizes differ"
        if not size == key.shape[-1] == value.shape[-1]
        else f"its head size {size} is not a multiple of 8 (ONNX Runtime's kernel needs one)"
        if size % 8
        else None
    )
    if why:
        raise ExportError(f"{type(module).__name__} cannot use ONNX Runtime's fused attention kernel: {why}")
    layer, past_key, past_value = cache.pending
    cache.pending = None
    batch, heads, length, _ = query.shape
    kv_heads = key.shape[1]
    if attention_mask is not None:
        attention_mask = additive(attention_mask, query.dtype)
    out, present_key, present_value = group_query_attention(
        query.transpose(1, 2).reshape(batch, length, heads * size),
        key.transpose(1, 2).reshape(batch, length, kv_heads * size),
        value.transpose(1, 2).reshape(batch, length, kv_heads * size),
        past_key,
        past_value,
        attention_mask,
        heads,
        kv_heads,
        float(size**-0.5 if scaling is None else scaling),
        float(softcap or 0.0),
    )
    cache.presents[layer] = (present_key, present_value)
    return out.reshape(batch, length, heads, size), None


def _register() -> bool:
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask
    except ImportError:  # an older transformers: the model keeps its own attention
        return False
    for name, function in ((NAME, grouped_attention), (FUSED, fused_attention)):
        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, eager_mask)
    return True


@contextmanager
def exporting_attention(lm: nn.Module, fused: bool = False):
    """`lm` (and every sub-model's config) set to `grouped_attention` (or `fused_attention`) inside the
    block, restored after; yields whether it was switched."""
    configs = {
        id(c): c
        for m in lm.modules()
        if (c := getattr(m, "config", None)) is not None
        and getattr(c, "_attn_implementation", None) in ("sdpa", "eager")
    }
    if not configs or not _register():
        yield False
        return
    before = {key: c._attn_implementation for key, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = FUSED if fused else NAME
        yield True
    finally:
        for key, c in configs.items():
            c._attn_implementation = before[key]
