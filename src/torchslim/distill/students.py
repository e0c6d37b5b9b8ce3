"""Students: a built-in or user model, or one derived from the teacher by width or by depth."""

from __future__ import annotations

import copy

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.prune import structured


def derive_width(teacher: nn.Module, example: torch.Tensor, ratio: float, importance: str = "l1") -> nn.Module:
    """The teacher with `ratio` of its channels, neurons and heads removed (structured pruning), so the
    student starts from the teacher's most important weights."""
    student = structured(copy.deepcopy(teacher).eval(), example, ratio=ratio, importance=importance)
    return student.requires_grad_(True)  # trainable even when the teacher is frozen


def keep_indices(n: int, keep_every: int) -> list[int]:
    """Every k-th block, always ending with the last one (it feeds the head)."""
    kept = list(range(keep_every - 1, n, keep_every)) or [n - 1]
    return kept if kept[-1] == n - 1 else kept + [n - 1]


def apply_keep_blocks(model: nn.Module, path: str, indices: list[int]) -> nn.Module:
    """Replace the Sequential/ModuleList at `path` by the blocks at `indices` (weights kept)."""
    try:
        container = model.get_submodule(path)
    except AttributeError:
        raise TorchslimError(f"student.blocks: the teacher has no module '{path}'.") from None
    if not isinstance(container, (nn.Sequential, nn.ModuleList)):
        raise TorchslimError(
            f"student.blocks: '{path}' is a {type(container).__name__}; depth reduction needs "
            "an nn.Sequential or nn.ModuleList of blocks."
        )
    new = (
        type(container)(*[container[i] for i in indices])
        if isinstance(container, nn.Sequential)
        else nn.ModuleList([container[i] for i in indices])
    )
    parent, _, leaf = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)
    return model


def derive_depth(teacher: nn.Module, path: str, keep_every: int = 2) -> tuple[nn.Module, list[int]]:
    """The teacher with only every k-th block of `path` (copying their weights)."""
    n = len(teacher.get_submodule(path))
    indices = keep_indices(n, keep_every)
    return apply_keep_blocks(copy.deepcopy(teacher), path, indices).requires_grad_(True), indices
