"""How channels are scored: an importance criterion maps a group to one score per channel.

A group's members are (module, role, positions-per-channel) triples; each criterion sums its
measure over every member that touches a channel, so coupled layers vote together."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from torchslim.prune.surgery import role_tensors

PRODUCING = ("out", "dw", "emb", "attn_out")


def _reduce(tensor: torch.Tensor, dim: int, positions: list[int], fn) -> float:
    part = tensor.detach().index_select(dim, torch.tensor(positions, device=tensor.device))
    return float(fn(part))


def _score(group, roles, fn, use_grad: bool = False) -> torch.Tensor:
    scores = torch.zeros(len(group.roots))
    for module, role, positions in group.members:
        if role not in roles:
            continue
        for tensor, dim in role_tensors(module, role):
            if use_grad:
                if tensor.grad is None:
                    continue
                tensor = (tensor * tensor.grad)
            for i, pos in enumerate(positions):
                if pos:
                    scores[i] += _reduce(tensor, dim, pos, fn)
    return scores


def l1(group) -> torch.Tensor:
    """Sum of |w| of the weights that produce each channel."""
    return _score(group, PRODUCING, lambda t: t.abs().sum())


def l2(group) -> torch.Tensor:
    """Euclidean norm of the weights that produce each channel."""
    return _score(group, PRODUCING, lambda t: t.pow(2).sum()).sqrt()


def bn_scale(group) -> torch.Tensor:
    """|gamma| of the normalisation layers on each channel (network slimming); L1 where there is none."""
    scores = _score(group, ("norm",), lambda t: t.abs().sum())
    return scores if scores.any() else l1(group)


def taylor(group) -> torch.Tensor:
    """First-order Taylor estimate of the loss change, |sum w * dL/dw|, over every tensor the channel
    touches. Needs gradients from a few batches (the pruner computes them)."""
    return _score(group, PRODUCING + ("in", "norm", "q_in", "k_in", "v_in"), lambda t: t.sum().abs(), use_grad=True)


def random(group) -> torch.Tensor:
    """A baseline: random scores from torch's generator."""
    return torch.rand(len(group.roots))


CRITERIA: dict[str, Callable] = {"l1": l1, "l2": l2, "bn_scale": bn_scale, "taylor": taylor, "random": random}


def head_scores(module: nn.Module, criterion: str) -> torch.Tensor:
    """One score per attention head: the criterion over the head's q/k/v rows and out_proj columns."""
    d, n = module.head_dim, module.num_heads
    scores = torch.zeros(n)
    for h in range(n):
        rows = list(range(h * d, (h + 1) * d))
        for proj, dim in ((module.q_proj, 0), (module.k_proj, 0), (module.v_proj, 0), (module.out_proj, 1)):
            w = proj.weight
            if criterion == "taylor" and w.grad is not None:
                scores[h] += _reduce(w * w.grad, dim, rows, lambda t: t.sum().abs())
            elif criterion == "l2":
                scores[h] += _reduce(w, dim, rows, lambda t: t.pow(2).sum())
            else:
                scores[h] += _reduce(w, dim, rows, lambda t: t.abs().sum())
    return torch.rand(n) if criterion == "random" else scores
