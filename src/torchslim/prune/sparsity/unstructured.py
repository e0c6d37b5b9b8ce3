"""Unstructured pruning: zero individual weights (magnitude, random, or the N:M pattern).

Masks are enforced during fine-tuning by zeroing the gradients of pruned weights, so state-dict keys
never change and a mask can always be re-derived from the zeros. `remove_masks` makes it permanent."""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.paths import matches

PRUNABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_layers(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Module]:
    ignore = list(ignore)
    return {name: m for name, m in model.named_modules() if isinstance(m, PRUNABLE) and not matches(name, ignore)}


def magnitude_masks(
    model: nn.Module,
    sparsity: float,
    scope: str = "global",
    ignore: Iterable[str] = (),
    random: bool = False,
    generator: torch.Generator | None = None,
) -> dict[str, torch.Tensor]:
    """Keep-masks removing the `sparsity` share of weights with the smallest |w| (or random ones),
    ranked over all layers together (`global`) or within each layer (`layer`). Zeros stay zeros."""
    if not 0.0 <= sparsity < 1.0:
        raise TorchslimError(f"sparsity must be in [0, 1), got {sparsity}.")
    layers = prunable_layers(model, ignore)
    if not layers:
        raise TorchslimError("the model has no Linear or Conv layers to prune (after `ignore`).")
    scores = {}
    for name, m in layers.items():
        w = m.weight.detach()
        s = torch.rand(w.shape, generator=generator) if random else w.abs()
        scores[name] = torch.where(w == 0, torch.full_like(s, -1.0), s)  # already-pruned weights go first
    if scope == "global":
        flat = torch.cat([s.flatten() for s in scores.values()])
        k = int(round(sparsity * flat.numel()))
        threshold = torch.kthvalue(flat, k).values if k > 0 else flat.min() - 1
        return {n: s > threshold for n, s in scores.items()}
    if scope != "layer":
        raise TorchslimError(f"scope must be 'global' or 'layer', got '{scope}'.")
    masks = {}
    for name, s in scores.items():
        k = int(round(sparsity * s.numel()))
        threshold = torch.kthvalue(s.flatten(), k).values if k > 0 else s.min() - 1
        masks[name] = s > threshold
    return masks


def nm_masks(model: nn.Module, n: int = 2, m: int = 4, ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """N:M sparsity: in every run of M consecutive input weights, keep the N largest. Layers whose
    input width is not a multiple of M are skipped."""
    if not 0 < n < m:
        raise TorchslimError(f"N:M needs 0 < n < m, got {n}:{m}.")
    masks = {}
    for name, layer in prunable_layers(model, ignore).items():
        w = layer.weight.detach()
        moved = w.movedim(1, -1)  # (out, ..., in)
        if moved.shape[-1] % m:
            continue
        groups = moved.abs().reshape(-1, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(1, groups.topk(n, dim=1).indices, True)
        masks[name] = keep.reshape(moved.shape).movedim(-1, 1)
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> list:
    """Zero the masked weights and keep them zero during training. Returns hook handles."""
    handles = []
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        weight = modules[name].weight
        with torch.no_grad():
            weight.mul_(mask.to(weight.dtype))
        keep = mask.to(weight.dtype)
        handles.append(weight.register_hook(lambda grad, keep=keep: grad * keep))
    return handles


def masks_from_zeros(model: nn.Module, ignore: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model, ignore).items()}


def remove_masks(handles: list) -> None:
    """Make pruning permanent: the zeros are already in the weights; only the hooks go."""
    for h in handles:
        h.remove()


def layer_sparsity(model: nn.Module) -> list[dict]:
    """Per prunable layer: weights, zeros and the sparsity share."""
    rows = []
    for name, m in prunable_layers(model).items():
        total = m.weight.numel()
        zeros = int((m.weight == 0).sum())
        rows.append({"layer": name, "weights": total, "zeros": zeros, "sparsity": zeros / total})
    return rows
