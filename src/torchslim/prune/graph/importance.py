"""How channels are scored: an importance criterion maps a group to one score per channel.

A group's members are (use, tensor, positions-per-channel) triples; each criterion sums its measure
over every member that touches a channel, so coupled layers (a residual stream, the q/k/v rows of an
attention head) vote together."""

from __future__ import annotations

from typing import Callable

import torch

PRODUCING = ("out", "dw")


def _per_position(tensor: torch.Tensor, dim: int, measure) -> torch.Tensor:
    """The measure of every slice along `dim`, as one vector."""
    t = measure(tensor.detach().float())
    other = [d for d in range(t.dim()) if d != dim % t.dim()]
    return t.sum(other) if other else t


def _score(group, roles, measure, use_grad: bool = False) -> torch.Tensor:
    scores = torch.zeros(len(group.roots))
    for use, tensor, positions in group.members:
        if use.role not in roles:
            continue
        if use_grad:
            if tensor.grad is None:
                continue
            tensor = tensor * tensor.grad
        vec = _per_position(tensor, use.dim, measure)
        if use_grad:
            vec = vec.abs()
        roots = torch.tensor([i for i, pos in enumerate(positions) for _ in pos], dtype=torch.long)
        flat = torch.tensor([p for pos in positions for p in pos], dtype=torch.long)
        if len(flat):
            scores.index_add_(0, roots, vec[flat])
    return scores


def l1(group) -> torch.Tensor:
    """Sum of |w| of the weights that produce each channel."""
    return _score(group, PRODUCING, torch.abs)


def l2(group) -> torch.Tensor:
    """Euclidean norm of the weights that produce each channel."""
    return _score(group, PRODUCING, torch.square).sqrt()


def bn_scale(group) -> torch.Tensor:
    """|gamma| of the normalisation layers on each channel (network slimming); L1 where there is none."""
    scores = _score(group, ("norm",), torch.abs)
    return scores if scores.any() else l1(group)


def taylor(group) -> torch.Tensor:
    """First-order Taylor estimate of the loss change, |sum w * dL/dw|, over every tensor the channel
    touches. Needs gradients from a few batches (the pruner computes them)."""
    return _score(group, PRODUCING + ("in", "norm", "param"), lambda t: t, use_grad=True)


def random(group) -> torch.Tensor:
    """A baseline: random scores from torch's generator."""
    return torch.rand(len(group.roots))


CRITERIA: dict[str, Callable] = {"l1": l1, "l2": l2, "bn_scale": bn_scale, "taylor": taylor, "random": random}
