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
from torchslim.prune.encoder import _keep_cols, _keep_rows, paired

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
IMPORTANCE = ("activation", "l1")


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder layers, if every one has the Llama layout; otherwise an error that says what is missing."""
    from torchslim.quantize.weights import repeated_blocks
    blocks = repeated_blocks(model)
    if blocks is None:
        raise TorchslimError(f"{type(model).__name__} has no repeated decoder layers to prune by width.")
    for block in blocks:
        attn, mlp = getattr(block, "self_attn", None), getattr(block, "mlp", None)
        missing = [f"self_attn.{n}" for n in ATTENTION if not isinstance(getattr(attn, n, None), nn.Linear)] + \
                  [f"mlp.{n}" for n in ("up_proj", "down_proj") if not isinstance(getattr(mlp, n, None), nn.Linear)]
        if missing or not isinstance(getattr(attn, "head_dim", None), int):
            raise TorchslimError(f"width pruning of a decoder needs the Llama layout (self_attn.q/k/v/o_proj with "
                                 f"head_dim, mlp.gate/up/down_proj); {type(block).__name__} lacks "
                                 f"{', '.join(missing) or 'self_attn.head_dim'}. Prune it by depth (method: "
                                 "blocks) or sparsity (wanda, sparsegpt) instead.")
    return blocks


def is_decoder(model: nn.Module) -> bool:
    try:
        decoder_blocks(model)
        return True
    except TorchslimError:
        return False


def _counts(block: nn.Module) -> tuple[int, int, int, int]:
    """(query heads, key/value heads, head size, FFN neurons) of a block, from its weights' shapes."""
    attn = block.self_attn
    size = attn.head_dim
    return attn.q_proj.out_features // size, attn.k_proj.out_features // size, size, block.mlp.down_proj.in_features


def layer_shapes(model: nn.Module) -> list[dict]:
    """Query heads, key/value heads, FFN neurons and the hidden size of every layer (what
    `resize_decoder` rebuilds)."""
    return [{**dict(zip(("heads", "kv_heads", "head_dim", "neurons"), _counts(b))),
             "hidden": b.self_attn.q_proj.in_features} for b in decoder_blocks(model)]


@torch.no_grad()
def _input_norms(model: nn.Module, batches: Iterable[tuple]) -> dict[int, torch.Tensor]:
    """Root-mean-square over the calibration tokens of every input column of each block's o_proj and
    down_proj (keyed by the module's id)."""
    from torchslim.quantize.weights import run_hooked
    sums: dict[int, torch.Tensor] = {}
    counts: dict[int, int] = {}

    def hook(module, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sums[id(module)] = sums.get(id(module), 0) + (x * x).sum(0)
        counts[id(module)] = counts.get(id(module), 0) + len(x)
    handles = [m.register_forward_pre_hook(hook) for b in decoder_blocks(model)
               for m in (b.self_attn.o_proj, b.mlp.down_proj)]
    run_hooked(model, batches, handles)
    if not counts:
        raise TorchslimError("width pruning with importance 'activation' saw no calibration tokens.")
    return {k: (sums[k] / counts[k]).sqrt() for k in sums}


def _scores(block: nn.Module, norms: dict[int, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(score per key/value head, score per FFN neuron) of one block."""
    attn, mlp = block.self_attn, block.mlp
    heads, kv, size, _ = _counts(block)
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
    heads, kv, size, _ = _counts(block)
    group = heads // kv
    kv_rows = (kv_heads[:, None] * size + torch.arange(size)).reshape(-1)
    q_heads = (kv_heads[:, None] * group + torch.arange(group)).reshape(-1)
    q_rows = (q_heads[:, None] * size + torch.arange(size)).reshape(-1)
    _keep_rows(attn.q_proj, q_rows)
    _keep_rows(attn.k_proj, kv_rows)
    _keep_rows(attn.v_proj, kv_rows)
    _keep_cols(attn.o_proj, q_rows)
    for name, value in (("num_heads", len(q_heads)), ("num_attention_heads", len(q_heads)),
                        ("num_key_value_heads", len(kv_heads))):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, value)
    for name in ("gate_proj", "up_proj"):
        if isinstance(getattr(mlp, name, None), nn.Linear):
            _keep_rows(getattr(mlp, name), neurons)
    _keep_cols(mlp.down_proj, neurons)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = len(neurons)


def _sync_config(model: nn.Module) -> None:
    """The config says the (uniform) widths, so the model reloads and serves with them."""
    from torchslim.prune.depth import _configs
    shapes = layer_shapes(model)
    if any(s != shapes[0] for s in shapes):
        return
    s = shapes[0]
    for config in _configs(model):
        config.num_attention_heads, config.num_key_value_heads = s["heads"], s["kv_heads"]
        config.head_dim, config.intermediate_size = s["head_dim"], s["neurons"]


def _kept_count(n: int, ratio: float, multiple: int = 1) -> int:
    keep = max(1, n - int(round(ratio * n)))
    if multiple > 1 and n % multiple == 0:
        keep = min(n, -(-keep // multiple) * multiple)
    return keep


@torch.no_grad()
def prune_decoder(model: nn.Module, head_ratio: float = 0.0, ffn_ratio: float = 0.0, batches=None,
                  importance: str = "activation", neuron_multiple: int = 32, hidden_ratio: float = 0.0) -> list[dict]:
    """Remove `head_ratio` of every layer's key/value heads (with their query groups) and `ffn_ratio`
    of its FFN neurons, the least important first (`importance`: 'activation' on `batches` of
    calibration inputs, or 'l1'), then `hidden_ratio` of the residual stream's channels
    (`prune.hidden`, calibration activations of the model pruned so far). Kept neuron and channel
    counts are multiples of `neuron_multiple` where the original count is (32: whole blocks for GGUF
    and MatMulNBits)."""
    if not (0 <= head_ratio < 1 and 0 <= ffn_ratio < 1 and 0 <= hidden_ratio < 1):
        raise TorchslimError(f"head_ratio, ffn_ratio and hidden_ratio must be in [0, 1), got {head_ratio}, "
                             f"{ffn_ratio}, {hidden_ratio}.")
    if importance not in IMPORTANCE:
        raise TorchslimError(f"decoder width pruning ranks by {' or '.join(IMPORTANCE)}, not '{importance}'.")
    if (importance == "activation" or hidden_ratio) and batches is None:
        raise TorchslimError("decoder width pruning with importance 'activation' (and hidden-size pruning) needs "
                             "calibration batches.")
    blocks = decoder_blocks(model)
    norms = _input_norms(model, batches) if importance == "activation" else None
    records = []
    for i, block in enumerate(blocks):
        heads, kv, _, neurons = _counts(block)
        head_scores, neuron_scores = _scores(block, norms)
        keep_kv = torch.argsort(head_scores, descending=True)[:_kept_count(kv, head_ratio)].sort().values
        keep_n = torch.argsort(neuron_scores, descending=True)[:_kept_count(neurons, ffn_ratio, neuron_multiple)]
        _keep_block(block, keep_kv, keep_n.sort().values)
        records.append({"layer": i, "kv_heads_before": kv, "kv_heads_after": len(keep_kv),
                        "kept_kv_heads": keep_kv.tolist(), "heads_before": heads,
                        "heads_after": len(keep_kv) * (heads // kv), "neurons_before": neurons,
                        "neurons_after": len(keep_n)})
    _sync_config(model)
    if hidden_ratio:
        from torchslim.prune.hidden import prune_hidden
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
    _sync_config(model)
    if shapes and "hidden" in shapes[0]:
        from torchslim.prune.hidden import resize_hidden
        resize_hidden(model, shapes[0]["hidden"])
    return model
