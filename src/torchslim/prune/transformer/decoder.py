"""Width pruning of Hugging Face decoder language models (the Llama layout shared by Llama, Mistral,
Qwen2/3, Gemma 1-3, SmolLM: `self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`): key/value heads
with their query groups, and FFN neurons, removed from the weight tensors.

- Grouped-query attention: query head i reads key/value head i // group, so a key/value head goes
  together with its whole query group (rows of q/k/v, columns of o_proj); the group size, and so the
  attention code's `num_key_value_groups`, is unchanged.
- An FFN neuron is a row of gate_proj and up_proj and a column of down_proj.
- Every layer keeps the same counts, so the config can say them (num_attention_heads,
  num_key_value_heads, intermediate_size, head_dim pinned): the model keeps working with its Hugging
  Face class, exports with its cache and writes a GGUF that llama.cpp reads. Which heads and neurons
  go is chosen per layer.
- Importance: `activation` (default; calibration text, as Minitron and Wanda): the expected size of
  what a neuron or head adds to the residual stream, the root-mean-square of its input to
  down_proj / o_proj times the norm of the weight column it multiplies; `l1`: the L1 norm of the
  weights a neuron or head owns (no data)."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models.transformer import (
    decoder_blocks,
    decoder_counts,
    decoder_shapes,
    keep_cols,
    keep_rows,
    kept_count,
    run_hooked,
    sync_decoder_config,
)
from torchslim.prune.transformer.encoder import paired
from torchslim.prune.transformer.hidden import prune_hidden, resize_hidden

IMPORTANCE = ("activation", "l1")
layer_shapes = decoder_shapes  # what `resize_decoder` rebuilds (the name prune.encoder uses too)


def is_decoder(model: nn.Module) -> bool:
    try:
        decoder_blocks(model)
        return True
    except TorchslimError:
        return False


@torch.no_grad()
def _input_norms(model: nn.Module, batches: Iterable[tuple]) -> dict[int, torch.Tensor]:
    """Root-mean-square over the calibration tokens of every input column of each block's o_proj and
    down_proj (keyed by the module's id)."""
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[id(module)] = sums.get(id(module), 0) + (x * x).sum(0)
        counts[id(module)] = counts.get(id(module), 0) + len(x)

    handles = [
        m.register_forward_pre_hook(hook) for b in decoder_blocks(model) for m in (b.self_attn.o_proj, b.mlp.down_proj)
    ]
    run_hooked(model, batches, handles)
    if not counts:
        raise TorchslimError("width pruning with importance 'activation' saw no calibration tokens.")
    return {k: (sums[k] / counts[k]).sqrt() for k in sums}


def _scores(block: nn.Module, norms: dict[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per key/value head, score per FFN neuron) of one block."""
    attn, mlp = block.self_attn, block.mlp
    heads, kv, size, _ = decoder_counts(block)
    o, down = attn.o_proj.weight.float(), mlp.down_proj.weight.float()
    if norms is not None:
        per_column = o.norm(dim=0) * norms[id(attn.o_proj)]
        neurons = down.norm(dim=0) * norms[id(mlp.down_proj)]
        per_head = per_column.reshape(heads, size).sum(1)
    else:
        own = lambda lin, n: lin.weight.float().abs().reshape(n, size, -1).sum((1, 2))  # noqa: E731
        per_head = own(attn.q_proj, heads) + o.abs().reshape(-1, heads, size).sum((0, 2))
        kv_own = own(attn.k_proj, kv) + own(attn.v_proj, kv)
        per_head = per_head + kv_own.repeat_interleave(heads // kv) / (heads // kv)
        rows = [mlp.up_proj] + ([mlp.gate_proj] if isinstance(getattr(mlp, "gate_proj", None), nn.Linear) else [])
        neurons = sum(lin.weight.float().abs().sum(1) for lin in rows) + down.abs().sum(0)
    return per_head.reshape(kv, heads // kv).sum(1), neurons


def _keep_block(block: nn.Module, kv_heads: torch.Tensor, neurons: torch.Tensor) -> None:
    attn, mlp = block.self_attn, block.mlp
    heads, kv, size, _ = decoder_counts(block)
    group = heads // kv
    kv_rows = (kv_heads[:, None] * size + torch.arange(size)).reshape(-1)
    q_heads = (kv_heads[:, None] * group + torch.arange(group)).reshape(-1)
    q_rows = (q_heads[:, None] * size + torch.arange(size)).reshape(-1)
    for norm, rows, width in (("q_norm", q_rows, heads * size), ("k_norm", kv_rows, kv * size)):
        weight = getattr(getattr(attn, norm, None), "weight", None)
        if isinstance(weight, nn.Parameter) and weight.shape == (width,):  # OLMo 2: one norm over all heads
            getattr(attn, norm).weight = nn.Parameter(weight.data[rows].clone())
    keep_rows(attn.q_proj, q_rows)
    keep_rows(attn.k_proj, kv_rows)
    keep_rows(attn.v_proj, kv_rows)
    keep_cols(attn.o_proj, q_rows)
    for name, value in (
        ("num_heads", len(q_heads)),
        ("num_attention_heads", len(q_heads)),
        ("num_key_value_heads", len(kv_heads)),
    ):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    for name in ("gate_proj", "up_proj"):
        if isinstance(getattr(mlp, name, None), nn.Linear):
            keep_rows(getattr(mlp, name), neurons)
    keep_cols(mlp.down_proj, neurons)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(neurons)


@torch.no_grad()
def prune_decoder(
    model: nn.Module,
    head_ratio: float = 0.0,
    ffn_ratio: float = 0.0,
    batches=None,
    importance: str = "activation",
    neuron_multiple: int = 32,
    hidden_ratio: float = 0.0,
) -> list[dict]:
    """Remove `head_ratio` of every layer's key/value heads (with their query groups) and `ffn_ratio`
    of its FFN neurons, the least important first (`importance`: 'activation' on `batches` of
    calibration inputs, or 'l1'), then `hidden_ratio` of the residual stream's channels
    (`prune.hidden`, calibration activations of the model pruned so far). Kept neuron and channel
    counts are multiples of `neuron_multiple` where the original count is (32: whole blocks for GGUF
    and MatMulNBits)."""
    if not (0 <= head_ratio < 1 and 0 <= ffn_ratio < 1 and 0 <= hidden_ratio < 1):
        raise TorchslimError(
            f"head_ratio, ffn_ratio and hidden_ratio must be in [0, 1), got {head_ratio}, {ffn_ratio}, {hidden_ratio}."
        )
    if importance not in IMPORTANCE:
        raise TorchslimError(f"decoder width pruning ranks by {' or '.join(IMPORTANCE)}, not '{importance}'.")
    if (importance == "activation" or hidden_ratio) and batches is None:
        raise TorchslimError(
            "decoder width pruning with importance 'activation' (and hidden-size pruning) needs calibration batches."
        )
    blocks = decoder_blocks(model)
    norms = _input_norms(model, batches) if importance == "activation" else None
    records = []
    for i, block in enumerate(blocks):
        heads, kv, _, neurons = decoder_counts(block)
        head_scores, neuron_scores = _scores(block, norms)
        keep_kv = torch.argsort(head_scores, descending=True)[: kept_count(kv, head_ratio)].sort().values
        keep_n = torch.argsort(neuron_scores, descending=True)[: kept_count(neurons, ffn_ratio, neuron_multiple)]
        _keep_block(block, keep_kv, keep_n.sort().values)
        records.append(
            {
                "layer": i,
                "kv_heads_before": kv,
                "kv_heads_after": len(keep_kv),
                "kept_kv_heads": keep_kv.tolist(),
                "heads_before": heads,
                "heads_after": len(keep_kv) * (heads // kv),
                "neurons_before": neurons,
                "neurons_after": len(keep_n),
            }
        )
    sync_decoder_config(model)
    if hidden_ratio:
        hidden = prune_hidden(model, hidden_ratio, batches, neuron_multiple)
        for record in records:
            record.update(hidden_before=hidden["hidden_before"], hidden_after=hidden["hidden_after"])
    return records


@torch.no_grad()
def resize_decoder(model: nn.Module, shapes: list[dict]) -> nn.Module:
    """Give every layer the head and neuron counts and the hidden size of `shapes` (from
    `layer_shapes`), keeping the first ones: the structure of a pruned model, whose weights are then
    loaded over it."""
    for block, shape in paired(decoder_blocks(model), shapes, "a decoder"):
        _keep_block(block, torch.arange(shape["kv_heads"]), torch.arange(shape["neurons"]))
    sync_decoder_config(model)
    if shapes and "hidden" in shapes[0]:
        resize_hidden(model, shapes[0]["hidden"])
    return model
