"""Bits per layer by a validation budget: which layers keep more bits is measured, not assumed.

    choice = mixed_bits(layers, floats, requantize, score, quick_score, budget=0.05)

1. Sensitivity: each layer alone at the low bits (every other layer float), the validation metric
   lost — on a short slice of the validation data (`quick_score`).
2. Allocation: the k most sensitive layers at the high bits, the rest low; the smallest k whose
   validation metric (`score`, the full slice) is within `budget` (a share of the float model's) is
   found by bisection (the loss falls as k grows), so a few full evaluations suffice."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from torchslim.log import console
from torchslim.quantize.fallback import sensitivity


def relative_drop(base: float, value: float) -> float:
    """Share of the float model's validation metric lost (larger is better; a language model's is
    minus the perplexity, so this is the perplexity's relative rise)."""
    return (base - value) / max(abs(base), 1e-12)


def mixed_bits(
    layers: dict[str, nn.Linear],
    floats: dict[str, torch.Tensor],
    requantize: Callable[[str], None],
    score: Callable[[], float],
    quick_score: Callable[[], float],
    budget: float,
) -> dict:
    """`layers` come quantized at the low bits; `floats` holds their float weights; `requantize(name)`
    puts a layer on the high-bit grid (in place, its integers kept for lowering). Leaves the layers at
    the chosen bits and returns what was measured."""
    low = {n: (m.weight.data, m.torchslim_weight_grid) for n, m in layers.items()}
    high: dict[str, tuple] = {}

    def put(name: str, state) -> None:
        layer = layers[name]
        if state is None:
            layer.weight.data = floats[name]
        else:
            layer.weight.data = state[0]
            object.__setattr__(layer, "torchslim_weight_grid", state[1])

    def at_high(name: str) -> tuple:
        if name not in high:
            requantize(name)
            high[name] = (layers[name].weight.data, layers[name].torchslim_weight_grid)
        return high[name]

    for name in layers:
        put(name, None)
    base_quick, base = quick_score(), score()

    def alone(name: str) -> float:
        put(name, low[name])
        value = quick_score()
        put(name, None)
        return relative_drop(base_quick, value)

    costs = sensitivity(list(layers), alone, "weight_only")
    order = sorted(layers, key=lambda n: -costs[n])
    measured: dict[int, float] = {}

    def drop_with(k: int) -> float:
        for i, name in enumerate(order):
            put(name, at_high(name) if i < k else low[name])
        measured[k] = relative_drop(base, score())
        console.log(
            f"weight_only: {k} layer(s) at the high bits, validation metric {100 * measured[k]:.2f}% below float"
        )
        return measured[k]

    lo, hi = 0, len(order)
    if drop_with(0) > budget:
        if drop_with(hi) > budget:
            console.log(f"weight_only: even every layer at the high bits loses more than the budget {budget}")
        else:
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if drop_with(mid) <= budget else (mid, hi)
        k = hi
    else:
        k = 0
    if list(measured)[-1] != k:  # leave the layers as chosen
        drop_with(k)
    return {
        "budget": budget,
        "float_validation": base,
        "validation_drop": measured[k],
        "high_layers": order[:k],
        "evaluated": {str(n): d for n, d in sorted(measured.items())},
        "sensitivity": [{"layer": n, "drop": costs[n]} for n in order],
    }
