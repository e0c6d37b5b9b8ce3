"""The one sensitivity-and-fallback loop of every quantizer (static int8 of any task's graph, the
embedding task's int8, the planner's per-layer int8 sensitivity):

1. `sensitivity`: the cost of quantizing each node alone (the task's validation metric lost);
2. `fallback`: quantize everything not excluded; while the result is not good enough, the costliest
   node left goes back to float and the graph is quantized again."""

from __future__ import annotations

from typing import Callable, Sequence

from torchslim.log import console, steps


def sensitivity(
    nodes: Sequence[str],
    cost_alone: Callable[[str], float],
    what: str,
    allows: Callable[[str], bool] = lambda node: True,
) -> dict[str, float]:
    """{node: cost of quantizing it alone}, with progress and the time left; `allows(node)` may stop
    early (a time budget), leaving the rest unmeasured."""
    costs: dict[str, float] = {}
    with steps(f"{what}: sensitivity of each node alone", len(nodes)) as progress:
        for node in nodes:
            if not allows(node):
                break
            costs[node] = cost_alone(node)
            progress.advance()
    return costs


def fallback(
    order: Sequence[str],
    quantize: Callable[[list[str]], object],
    score: Callable[[object], float],
    good_enough: Callable[[float], bool],
    start: Sequence[str] = (),
    what: str = "quantize",
    scored: float | None = None,
) -> tuple[list[str], float]:
    """Quantize with `start` excluded (unless `scored` says that graph is already built and what it
    scored); while `good_enough(score)` fails, exclude the next node of `order` (costliest first) and
    quantize again. Returns (excluded nodes, last score)."""
    excluded, left = list(start), [n for n in order if n not in start]
    value = score(quantize(excluded)) if scored is None else scored
    while not good_enough(value) and left:
        excluded.append(left.pop(0))
        value = score(quantize(excluded))
        console.log(f"{what}: {len(excluded)} node(s) in float, validation score {value:.4f}")
    return excluded, value
