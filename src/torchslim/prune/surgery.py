"""Cutting one layer type: which tensors a role indexes, and how a layer loses positions physically."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.prune.attention import Attention


def role_tensors(module: nn.Module, role: str) -> list[tuple[torch.Tensor, int]]:
    """(tensor, dim) pairs whose positions along `dim` are the role's channel positions."""
    def present(*pairs):
        return [(t, d) for t, d in pairs if t is not None]
    if role in ("out", "dw"):
        return present((module.weight, 0), (getattr(module, "bias", None), 0))
    if role == "in":
        return [(module.weight, 1)] if getattr(module, "groups", 1) == 1 else []
    if role == "norm":
        return present((getattr(module, "weight", None), 0), (getattr(module, "bias", None), 0))
    if role == "emb":
        return [(module.weight, 1)]
    if role in ("q_in", "k_in", "v_in"):
        return [(getattr(module, role[0] + "_proj").weight, 1)]
    if role == "attn_out":
        return present((module.out_proj.weight, 0), (module.out_proj.bias, 0))
    raise ValueError(role)


def _take(owner: nn.Module, name: str, dim: int, keep: torch.Tensor) -> None:
    tensor = getattr(owner, name, None)
    if tensor is None:
        return
    data = tensor.detach().index_select(dim, keep.to(tensor.device)).clone()
    if isinstance(tensor, nn.Parameter):
        setattr(owner, name, nn.Parameter(data, requires_grad=tensor.requires_grad))
    else:
        owner.register_buffer(name, data)


def _grouped_in(conv: nn.Module, keep: list[int], out_keep: list[int] | None) -> None:
    """Grouped conv input channels: the same number kept in every group, mapped to local columns."""
    groups, cin_g = conv.groups, conv.in_channels // conv.groups
    cout_g = conv.out_channels // groups
    rows = out_keep if out_keep is not None else list(range(conv.out_channels))
    blocks = []
    for gi in range(groups):
        local = torch.tensor([p - gi * cin_g for p in keep if p // cin_g == gi])
        group_rows = torch.tensor([r for r in rows if r // cout_g == gi])
        blocks.append(conv.weight.detach()[group_rows][:, local])
    conv.weight = nn.Parameter(torch.cat(blocks).clone(), requires_grad=conv.weight.requires_grad)
    if out_keep is not None and conv.bias is not None:
        _take(conv, "bias", 0, torch.tensor(out_keep))
    conv.in_channels, conv.out_channels = len(keep), len(rows)


def cut(module: nn.Module, keeps: dict[str, list[int]], heads: list[int] | None = None) -> None:
    """Remove every position not in `keeps[role]` from `module`, updating its shape attributes."""
    idx = {role: torch.tensor(k, dtype=torch.long) for role, k in keeps.items()}
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        if "dw" in idx:
            _take(module, "weight", 0, idx["dw"])
            _take(module, "bias", 0, idx["dw"])
            module.in_channels = module.out_channels = module.groups = len(keeps["dw"])
        elif module.groups > 1 and "in" in keeps:
            _grouped_in(module, keeps["in"], keeps.get("out"))
        else:
            _cut_dense(module, idx, "in_channels", "out_channels")
    elif isinstance(module, nn.Linear):
        _cut_dense(module, idx, "in_features", "out_features")
    elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)):
        for name in ("weight", "bias", "running_mean", "running_var"):
            _take(module, name, 0, idx["norm"])
        n = len(keeps["norm"])
        if isinstance(module, nn.LayerNorm):
            module.normalized_shape = (n,)
        elif isinstance(module, nn.GroupNorm):
            module.num_channels = n
        else:
            module.num_features = n
    elif isinstance(module, nn.Embedding):
        _take(module, "weight", 1, idx["emb"])
        module.embedding_dim = len(keeps["emb"])
    elif isinstance(module, Attention):
        _cut_attention(module, keeps, idx, heads)
    else:
        raise TypeError(f"no surgery for {type(module).__name__}")


def _cut_dense(module: nn.Module, idx: dict, in_attr: str, out_attr: str) -> None:
    """Conv (groups == 1) and Linear: output positions are weight rows, input positions columns."""
    if "out" in idx:
        _take(module, "weight", 0, idx["out"])
        _take(module, "bias", 0, idx["out"])
        setattr(module, out_attr, len(idx["out"]))
    if "in" in idx:
        _take(module, "weight", 1, idx["in"])
        setattr(module, in_attr, len(idx["in"]))


def _cut_attention(module: Attention, keeps, idx, heads: list[int] | None) -> None:
    for role in ("q_in", "k_in", "v_in"):
        if role in idx:
            proj = getattr(module, role[0] + "_proj")
            _take(proj, "weight", 1, idx[role])
            proj.in_features = len(keeps[role])
    module.embed_dim = module.q_proj.in_features
    if "attn_out" in idx:
        _take(module.out_proj, "weight", 0, idx["attn_out"])
        _take(module.out_proj, "bias", 0, idx["attn_out"])
        module.out_proj.out_features = len(keeps["attn_out"])
    if heads is not None:
        rows = torch.tensor([h * module.head_dim + i for h in heads for i in range(module.head_dim)])
        for proj in (module.q_proj, module.k_proj, module.v_proj):
            _take(proj, "weight", 0, rows)
            _take(proj, "bias", 0, rows)
            proj.out_features = len(rows)
        _take(module.out_proj, "weight", 1, rows)
        module.out_proj.in_features = len(rows)
        module.num_heads = len(heads)
