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
    # what the stage does to the model: `changes_model` stages work on (and change) the PyTorch model,
    # so they cannot follow a `lowers` stage, after which the served artifact is a runtime file
    changes_model: bool = True
    lowers: bool = False


_STAGES: dict[str, StageHandler] = {}


def register_stage(name: str, config: type[BaseModel], compresses: bool = False,
                   tasks: tuple[str, ...] = ("classification",), changes_model: bool = True, lowers: bool = False):
    """Decorator placed next to a handler: `@register_stage("prune", PruneConfig, compresses=True)`.

    `lowers=True`: the stage turns the model into a runtime artifact (ONNX Runtime int8, ...) that is
    served from then on. `changes_model=False`: the stage only reads the model (export, reporting), so
    it may follow a lowering stage; every other stage changes weights or structure and may not."""

    def wrap(fn: Callable) -> Callable:
        if name in _STAGES:
            raise ValueError(f"stage '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _STAGES[name] = StageHandler(name, config, fn, doc[0] if doc else "", compresses, tasks, changes_model, lowers)
        return fn

    return wrap


def stage_names() -> list[str]:
    _load_builtin_stages()
    return sorted(_STAGES)


def get_stage(name: str, where: str = "stages") -> StageHandler:
    _load_builtin_stages()
    if name not in _STAGES:
        import difflib
        near = difflib.get_close_matches(name, _STAGES, n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise RecipeError(f"{where}: unknown stage '{name}'.{hint} Available stages: {', '.join(sorted(_STAGES))}.")
    return _STAGES[name]


def _load_builtin_stages() -> None:
    import torchslim.stages  # noqa: F401  (explicit imports there fill the registry)


def lowering_conflict(names: list[str]) -> str | None:
    """A message when a stage that changes the model comes after one that lowered it, else None."""
    lowered = None
    for i, name in enumerate(names):
        handler = get_stage(name)
        if lowered is not None and handler.changes_model:
            j, first = lowered
            return (f"stages[{i}] '{name}' changes the model, but stages[{j}] '{first}' already lowered it to the "
                    f"runtime artifact that is served from then on, so '{name}' would change a model nobody "
                    f"serves and every later number would describe the artifact of '{first}'. Put '{name}' before "
                    f"'{first}' (lowering comes last; 'export' may follow it).")
        if handler.lowers and lowered is None:
            lowered = (i, name)
    return None
