"""Cutting: remove positions from parameter and buffer tensors, then bring each changed layer's shape
attributes in line with its tensors. One small resize function per layer type, registered by type
(`@resizer(nn.Linear)`); a layer type without one keeps working when its code reads shapes from its
tensors (most norms and scales do)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from torchslim.models.attention import Attention
from torchslim.models.shapes import register_shape_attrs, shape_attrs_for

RESIZERS: dict[type, Callable[[nn.Module, dict], None]] = {}
HEAD_COUNTS = (
    "num_heads",
    "num_attention_heads",
    "n_heads",
    "n_head",
    "heads",
    "num_key_value_heads",
    "num_kv_heads",
    "n_kv_heads",
    "num_attention_heads_per_partition",
)
HEAD_WIDTHS = ("all_head_size", "inner_dim", "inner_size", "split_size")


def resizer(*types: type):
    """Register `fn(module, before)` to update a layer's attributes after its tensors were cut;
    `before` holds its tensors' shapes before the cut."""

    def register(fn):
        for t in types:
            RESIZERS[t] = fn
        return fn

    return register


def _replace(owner: nn.Module, name: str, data: torch.Tensor) -> None:
    old = getattr(owner, name)
    if isinstance(old, nn.Parameter):
        setattr(owner, name, nn.Parameter(data, requires_grad=old.requires_grad))
    else:
        owner.register_buffer(name, data, persistent=name not in owner._non_persistent_buffers_set)


def cut_tensor(model: nn.Module, key: str, dim: int, gone: set[int]) -> None:
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path) if owner_path else model
    tensor = getattr(owner, name)
    keep = torch.tensor([i for i in range(tensor.shape[dim]) if i not in gone], dtype=torch.long)
    _replace(owner, name, tensor.detach().index_select(dim, keep.to(tensor.device)).clone())


def cut_grouped_columns(model: nn.Module, key: str, gone: set[int], groups: int) -> None:
    """A grouped convolution's input channels: positions are global, columns local to each group;
    the same number goes from every group (the plan guarantees it)."""
    owner_path, _, name = key.rpartition(".")
    owner = model.get_submodule(owner_path)
    weight = getattr(owner, name).detach()
    cin_g, rows_g = weight.shape[1], weight.shape[0] // groups
    blocks = []
    for gi in range(groups):
        local = torch.tensor([c for c in range(cin_g) if gi * cin_g + c not in gone], dtype=torch.long)
        blocks.append(weight[gi * rows_g : (gi + 1) * rows_g][:, local])
    _replace(owner, name, torch.cat(blocks).clone())


def resize(module: nn.Module, before: dict[str, tuple]) -> None:
    for cls in type(module).__mro__:
        fn = RESIZERS.get(cls) or RESIZERS_BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if fn is not None:
            fn(module, before)
            return


def resize_heads(module: nn.Module, old: int, new: int, unit: int, skip: set[str] = frozenset()) -> list[str]:
    """Head counts and head widths of an attention module whose code reads them from attributes; the
    attributes changed are recorded beside the weights, so the module rebuilds on load."""
    changed = []
    for attr in HEAD_COUNTS:
        if attr not in skip and getattr(module, attr, None) == old:
            setattr(module, attr, new)
            changed.append(attr)
    for attr in HEAD_WIDTHS:
        if attr not in skip and getattr(module, attr, None) == old * unit:
            setattr(module, attr, new * unit)
            changed.append(attr)
    if changed and shape_attrs_for(module) is None:
        register_shape_attrs(type(module), tuple(a for a in HEAD_COUNTS + HEAD_WIDTHS if hasattr(module, a)))
    return changed


@resizer(nn.Linear)
def _linear(m, before):
    m.out_features, m.in_features = m.weight.shape


@resizer(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(m, before):
    old = before.get("weight", tuple(m.weight.shape))
    if m.groups == old[0] and old[1] == 1:  # depthwise stays depthwise
        m.groups = m.weight.shape[0]
    m.out_channels, m.in_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@resizer(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv_transpose(m, before):
    m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups


@resizer(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d)
def _batch_norm(m, before):
    m.num_features = next(t for t in (m.weight, m.running_mean) if t is not None).shape[0]


@resizer(nn.LayerNorm, nn.RMSNorm)
def _layer_norm(m, before):
    m.normalized_shape = tuple(m.weight.shape)


@resizer(nn.GroupNorm)
def _group_norm(m, before):
    m.num_channels = m.weight.shape[0]


@resizer(nn.Embedding)
def _embedding(m, before):
    m.num_embeddings, m.embedding_dim = m.weight.shape


@resizer(Attention)
def _attention(m, before):
    m.embed_dim = m.q_proj.in_features
    m.num_heads = m.q_proj.out_features // m.head_dim


def _hf_conv1d(m, before):
    m.nf = m.weight.shape[1]
    if shape_attrs_for(m) is None:
        register_shape_attrs(type(m), ("nf",))


# Hugging Face's Conv1D (GPT-2) stores its weight (in, out) and reads `nf`; matched by name so that
# pruning does not import transformers
RESIZERS_BY_NAME = {"transformers.pytorch_utils.Conv1D": _hf_conv1d}
