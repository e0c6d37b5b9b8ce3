"""The budget-driven planner (`torchslim auto`, or an `auto` stage in a recipe)."""

from torchslim.auto.planner import AutoConfig, search

__all__ = ["AutoConfig", "search"]
