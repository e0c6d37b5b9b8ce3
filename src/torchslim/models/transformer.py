"""Transformer structure, in one place for prune, quantize and distill: the repeated blocks, what the
first block receives, hooked calibration runs, the configs that describe the widths, and keeping
rows or columns of a Linear layer.

    blocks = repeated_blocks(model)                  # the decoder/encoder layers, or None
    run_hooked(model, batches, handles)              # forward passes for what hooks record
    inputs = block_inputs(model, blocks[0], batches) # (args, kwargs) the first block receives"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from torchslim.errors import TorchslimError

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def run_hooked(model: nn.Module, batches: Iterable[tuple], handles: list) -> None:
    """Run `model` on every batch without gradients (for what its hooks record), then remove the
    hook `handles`, also when a batch fails."""
    try:
        with torch.no_grad():
            for batch in batches:
                model(*batch)
    finally:
        for h in handles:
            h.remove()


class _Captured(Exception):
    pass


def repeated_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The longest list of blocks holding Linear layers (a transformer's decoder layers), or None."""
    lists = [
        m
        for m in model.modules()
        if isinstance(m, nn.ModuleList)
        and len(m) > 1
        and all(any(isinstance(x, nn.Linear) for x in b.modules()) for b in m)
    ]
    return max(lists, key=len) if lists else None


def block_inputs(model: nn.Module, first: nn.Module, batches: Iterable[tuple]) -> list[tuple[tuple, dict]]:
    """What the first block receives for each batch (hidden states and everything else it is passed)."""
    seen: list[tuple[tuple, dict]] = []

    def grab(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    model(*batch)
                except _Captured:
                    pass
    finally:
        handle.remove()
    return seen


class Replay(nn.Module):
    """Calls a block with recorded (args, kwargs) pairs, so collect_hessians can feed it."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, args, kwargs):
        return self.block(*args, **kwargs)


def hidden_states(out):
    """A block's hidden-state output (blocks that return a tuple put it first)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """`repeated_blocks`, or an error when the model has none."""
    blocks = repeated_blocks(model)
    if blocks is None:
        raise TorchslimError(
            "depth pruning needs a model with repeated blocks (a transformer's layers in an "
            "nn.ModuleList); this model has none."
        )
    return blocks


def model_configs(model: nn.Module) -> list:
    """Every distinct Hugging Face config in the model (the ones that count layers)."""
    seen, out = set(), []
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "num_hidden_layers"):
            seen.add(id(config))
            out.append(config)
    return out


def keep_rows(linear: nn.Linear, rows: torch.Tensor) -> None:
    """Keep only the output rows `rows` of `linear` (weight and bias), in place."""
    linear.weight = nn.Parameter(linear.weight.data[rows].clone())
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.data[rows].clone())
    linear.out_features = len(rows)


def keep_cols(linear: nn.Linear, cols: torch.Tensor) -> None:
    """Keep only the input columns `cols` of `linear`, in place."""
    linear.weight = nn.Parameter(linear.weight.data[:, cols].clone())
    linear.in_features = len(cols)


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, if every one has the Llama layout; otherwise an error that says what is missing."""
    blocks = repeated_blocks(model)
    if blocks is None:
        raise TorchslimError(f"{type(model).__name__} has no repeated decoder layers to prune by width.")
    for block in blocks:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        missing = [f"self_attn.{n}" for n in ATTENTION if not isinstance(getattr(attn, n, None), nn.Linear)] + [
            f"mlp.{n}" for n in ("up_proj", "down_proj") if not isinstance(getattr(mlp, n, None), nn.Linear)
        ]
        if missing or not isinstance(getattr(attn, "head_dim", None), int):
            raise TorchslimError(
                f"width pruning of a decoder needs the Llama layout (self_attn.q/k/v/o_proj with "
                f"head_dim, mlp.gate/up/down_proj); {type(block).__name__} lacks "
                f"{', '.join(missing) or 'self_attn.head_dim'}. Prune it by depth (method: "
                "blocks) or sparsity (wanda, sparsegpt) instead."
            )
    return blocks


def decoder_counts(block: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head size, FFN neurons) of a block, from its weights' shapes."""
    attn = block.self_attn
    size = attn.head_dim
    return attn.q_proj.out_features // size, attn.k_proj.out_features // size, size, block.mlp.down_proj.in_features


def decoder_shapes(model: nn.Module) -> list[dict]:
    """Query heads, key/value heads, FFN neurons and the hidden size of every layer (what
    `resize_decoder` rebuilds)."""
    return [
        {
            **dict(zip(("heads", "kv_heads", "head_dim", "neurons"), decoder_counts(b))),
            "hidden": b.self_attn.q_proj.in_features,
        }
        for b in decoder_blocks(model)
    ]


def sync_decoder_config(model: nn.Module) -> None:
    """The config says the (uniform) widths, so the model reloads and serves with them."""
    shapes = decoder_shapes(model)
    if any(s != shapes[0] for s in shapes):
        return
    s = shapes[0]
    for config in model_configs(model):
        config.num_attention_heads, config.num_key_value_heads = s["heads"], s["kv_heads"]
        config.head_dim, config.intermediate_size = s["head_dim"], s["neurons"]


def kept_count(n: int, ratio: float, multiple: int = 1) -> int:
    """How many of `n` units remain after removing `ratio` of them, rounded up to `multiple` when it divides `n`."""
    keep = max(1, n - int(round(ratio * n)))
    if multiple > 1 and n % multiple == 0:
        keep = min(n, -(-keep // multiple) * multiple)
    return keep
