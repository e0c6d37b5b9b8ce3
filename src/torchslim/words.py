"""Numbers in words that say what happened: "1.27× slower", not "0.79x faster"; "+0.40 points
better", not "drop -0.40 points". Every summary line a person reads goes through these."""

from __future__ import annotations

import math


def speed(ratio: float) -> str:
    """`ratio` = reference time / new time: '2.31× faster', '1.27× slower' or 'as fast (1.00×)'."""
    if not math.isfinite(ratio) or ratio <= 0:
        return "speed not measured"
    if round(ratio, 2) == 1.0:
        return "as fast (1.00×)"
    return f"{ratio:.2f}× faster" if ratio > 1 else f"{1 / ratio:.2f}× slower"


def size(before: float, after: float) -> str:
    """'4.00× smaller (-75.0%)', '1.10× larger (+10.0%)' or 'the same size'."""
    if before <= 0 or after <= 0:
        return "size not measured"
    if before == after:
        return "the same size"
    change = after / before - 1
    return (
        f"{before / after:.2f}× smaller ({change:+.1%})"
        if after < before
        else f"{after / before:.2f}× larger ({change:+.1%})"
    )


def points(change: float, higher_is_better: bool = True, scale: float = 100.0, unit: str = "points") -> str:
    """A change of a metric (new - reference) against the reference: '+0.40 points better',
    '-1.20 points worse', 'unchanged'. `scale` turns a fraction into points (accuracy: 100)."""
    value = change * scale
    if not math.isfinite(value):
        return "not measured"
    if round(value, 2) == 0:
        return "unchanged"
    better = (value > 0) == higher_is_better
    return f"{value:+.2f} {unit} {'better' if better else 'worse'}"
