"""Structured pruning of BERT-family encoders (Hugging Face layout): attention heads and FFN
neurons removed from the weight tensors.

A head is a slice of `head_size` rows of query/key/value and the matching columns of the attention
output projection; an FFN neuron is a row of `intermediate.dense` and a column of `output.dense`.
Importance is the L1 norm of everything a head or neuron owns. The attention code reshapes with
`view(..., -1, head_size)`, so fewer rows means fewer heads without touching the config."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models.transformer import keep_cols, keep_rows


def encoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in ("encoder.encoder.layer", "encoder.layer", "bert.encoder.layer"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise TorchslimError(f"{type(model).__name__} is not a BERT-family encoder (no encoder.layer list).")


def is_encoder(model: nn.Module) -> bool:
    """A BERT-family encoder (Hugging Face layout), pruned by heads and FFN neurons here."""
    try:
        encoder_layers(model)
        return True
    except TorchslimError:
        return False


def head_scores(layer: nn.Module) -> torch.Tensor:
    att = layer.attention.self
    size = att.attention_head_size
    heads = att.query.out_features // size
    own = sum(lin.weight.abs().reshape(heads, size, -1).sum((1, 2)) for lin in (att.query, att.key, att.value))
    out = layer.attention.output.dense.weight.abs().reshape(-1, heads, size).sum((0, 2))
    return own + out


def neuron_scores(layer: nn.Module) -> torch.Tensor:
    return layer.intermediate.dense.weight.abs().sum(1) + layer.output.dense.weight.abs().sum(0)


def _keep(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    n = len(scores)
    keep = max(1, n - int(round(ratio * n)))
    return torch.argsort(scores, descending=True)[:keep].sort().values


def _keep_layer(layer: nn.Module, heads: torch.Tensor, neurons: torch.Tensor) -> None:
    att = layer.attention.self
    size = att.attention_head_size
    rows = (heads[:, None] * size + torch.arange(size)).reshape(-1)
    for lin in (att.query, att.key, att.value):
        keep_rows(lin, rows)
    keep_cols(layer.attention.output.dense, rows)
    att.num_attention_heads, att.all_head_size = len(heads), len(rows)
    keep_rows(layer.intermediate.dense, neurons)
    keep_cols(layer.output.dense, neurons)


def layer_shapes(model: nn.Module) -> list[dict]:
    """Heads and FFN neurons of every layer: what `resize_encoder` needs to rebuild the structure."""
    return [
        {"heads": layer.attention.self.num_attention_heads, "neurons": layer.intermediate.dense.out_features}
        for layer in encoder_layers(model)
    ]


@torch.no_grad()
def prune_encoder(model: nn.Module, head_ratio: float = 0.0, ffn_ratio: float = 0.0) -> list[dict]:
    """Remove `head_ratio` of every layer's heads and `ffn_ratio` of its FFN neurons (lowest L1)."""
    if not (0 <= head_ratio < 1 and 0 <= ffn_ratio < 1):
        raise TorchslimError(f"head_ratio and ffn_ratio must be in [0, 1), got {head_ratio}, {ffn_ratio}.")
    records = []
    for i, (layer, shape) in enumerate(zip(encoder_layers(model), layer_shapes(model))):
        heads, neurons = _keep(head_scores(layer), head_ratio), _keep(neuron_scores(layer), ffn_ratio)
        _keep_layer(layer, heads, neurons)
        records.append(
            {
                "layer": i,
                "heads_before": shape["heads"],
                "heads_after": len(heads),
                "kept_heads": heads.tolist(),
                "neurons_before": shape["neurons"],
                "neurons_after": len(neurons),
            }
        )
    return records


@torch.no_grad()
def resize_encoder(model: nn.Module, shapes: list[dict]) -> nn.Module:
    """Give every layer the head and neuron counts of `shapes` (from `layer_shapes`), keeping the first
    ones: the structure of a pruned model, whose weights are then loaded over it."""
    for layer, shape in paired(encoder_layers(model), shapes, "an encoder"):
        _keep_layer(layer, torch.arange(shape["heads"]), torch.arange(shape["neurons"]))
    return model


def paired(layers, shapes: list[dict], what: str):
    """(layer, its recorded shape) pairs; an error if the counts differ."""
    if len(shapes) != len(layers):
        raise TorchslimError(f"{len(shapes)} layer shapes for {what} with {len(layers)} layers.")
    return zip(layers, shapes)
