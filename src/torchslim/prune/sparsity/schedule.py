"""Pruning schedules: the target sparsity (or channel ratio) after each pruning step."""

from __future__ import annotations


def one_shot(final: float) -> list[float]:
    return [final]


def equal_steps(final: float, steps: int) -> list[float]:
    """N equal increments up to `final`."""
    return [final * (k + 1) / steps for k in range(steps)]


def gradual(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n dt))^3 at t = t0 + dt, ..., t0 + n dt:
    prunes fast while many weights are redundant and slows down as the target nears."""
    return [final + (initial - final) * (1 - (k + 1) / steps) ** 3 for k in range(steps)]


def targets(kind: str, final: float, steps: int = 1, initial: float = 0.0) -> list[float]:
    if kind == "one_shot":
        return one_shot(final)
    if kind == "steps":
        return equal_steps(final, steps)
    if kind == "gradual":
        return gradual(final, steps, initial)
    raise ValueError(f"unknown schedule '{kind}'")


def step_ratio(previous: float, target: float) -> float:
    """Share of the *remaining* channels to remove to go from cumulative `previous` to `target`."""
    return 0.0 if target <= previous else 1.0 - (1.0 - target) / (1.0 - previous)
