"""The explicit stage registry: a recipe names stages, this maps each name to its handler."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from torchslim.errors import RecipeError


@dataclass(frozen=True)
class StageHandler:
    name: str
    config: type[BaseModel]
    apply: Callable  # apply(model, config, ctx) -> model
    summary: str
    compresses: bool = False  # the report judges compression against the model before the first such stage
    tasks: tuple[str, ...] = ("classification",)


_STAGES: dict[str, StageHandler] = {}


def register_stage(name: str, config: type[BaseModel], compresses: bool = False,
                   tasks: tuple[str, ...] = ("classification",)):
    """Decorator placed next to a handler: `@register_stage("prune", PruneConfig, compresses=True)`."""

    def wrap(fn: Callable) -> Callable:
        if name in _STAGES:
            raise ValueError(f"stage '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _STAGES[name] = StageHandler(name, config, fn, doc[0] if doc else "", compresses, tasks)
        return fn

    return wrap


def stage_names() -> list[str]:
    _load_builtin_stages()
    return sorted(_STAGES)


def get_stage(name: str, where: str = "stages") -> StageHandler:
    _load_builtin_stages()
    if name not in _STAGES:
        raise RecipeError(f"{where}: unknown stage '{name}'. Available stages: {', '.join(sorted(_STAGES))}.")
    return _STAGES[name]


def _load_builtin_stages() -> None:
    import torchslim.stages  # noqa: F401  (explicit imports there fill the registry)
