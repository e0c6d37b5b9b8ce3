"""The explicit stage registry: a recipe names stages, this maps each name (and the recipe's task) to
its handler.

A stage name may have one generic handler (any task that provides what it `needs`) and handlers
specific to a task, which win for that task: `quantize` is one generic handler (ONNX Runtime int8 of
any exported graph, fallback scored with the task's metric) plus the embedding task's own (fused
transformer graph, cosine fallback). Old names live on as aliases that warn."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from torchslim.errors import RecipeError


@dataclass(frozen=True)
class StageHandler:
    name: str
    config: type[BaseModel]
    apply: Callable  # apply(model, config, ctx) -> nn.Module or torchslim.results.StageResult
    summary: str
    compresses: bool = False  # the report judges compression against the model before the first such stage
    tasks: tuple[str, ...] | None = None  # None: every task that provides what `needs` names
    # what the stage does to the model: `changes_model` stages work on (and change) the PyTorch model,
    # so they cannot follow a `lowers` stage, after which the served artifact is a runtime file
    changes_model: bool = True
    lowers: bool = False
    needs: tuple[str, ...] = ()  # what the task must provide ("labels", "classifier", "encoder")


_STAGES: dict[str, list[StageHandler]] = {}
_ALIASES: dict[str, tuple[str, str]] = {}  # old name -> (name, message)


def register_stage(
    name: str,
    config: type[BaseModel],
    compresses: bool = False,
    tasks: tuple[str, ...] | None = None,
    changes_model: bool = True,
    lowers: bool = False,
    needs: tuple[str, ...] = (),
    summary: str | None = None,
):
    """Decorator placed next to a handler: `@register_stage("prune", PruneConfig, compresses=True)`.

    `tasks`: the tasks this handler is for (None: any task providing `needs`). `lowers=True`: the
    stage turns the model into a runtime artifact (ONNX Runtime int8, ...) that is served from then
    on. `changes_model=False`: the stage only reads the model (export, reporting), so it may follow a
    lowering stage; every other stage changes weights or structure and may not. `summary`: the one
    line shown for it (default: the first line of the handler's docstring); one handler registered for
    several settings classes (`distill`, once per task) gives each its own."""

    def wrap(fn: Callable) -> Callable:
        variants = _STAGES.setdefault(name, [])
        for v in [v for v in variants if v.tasks == (tuple(tasks) if tasks else None)]:
            if not same_definition(v.apply, fn):
                raise ValueError(f"stage '{name}' is registered twice for {'every task' if tasks is None else tasks}")
            variants.remove(v)  # the same module imported again (a recipe's own copy of it): the new one wins
        doc = (fn.__doc__ or "").strip().splitlines()
        variants.append(
            StageHandler(
                name,
                config,
                fn,
                summary or (doc[0] if doc else ""),
                compresses,
                tuple(tasks) if tasks else None,
                changes_model,
                lowers,
                tuple(needs),
            )
        )
        return fn

    return wrap


def same_definition(old: object, new: object) -> bool:
    """`new` is `old` defined again: the same module and name, as when a user's module is imported anew
    from another recipe's folder in one process."""
    return (old.__module__, old.__qualname__) == (new.__module__, new.__qualname__)


def register_alias(old: str, name: str, message: str) -> None:
    """`old` is accepted for `name` (with `message` as a deprecation warning) for one release."""
    _ALIASES[old] = (name, message)


def stage_names() -> list[str]:
    return sorted(_STAGES)


def resolve_alias(name: str) -> tuple[str, str | None]:
    """(the current name, a deprecation message or None)."""
    return _ALIASES.get(name, (name, None))


def get_stage(name: str, where: str = "stages", task=None) -> StageHandler:
    """The handler of stage `name` for `task` (a Task class or instance; None: the first variant)."""
    name = _ALIASES.get(name, (name, None))[0]
    if name not in _STAGES:
        import difflib

        near = difflib.get_close_matches(name, list(_STAGES) + list(_ALIASES), n=1)
        hint = f" Did you mean '{near[0]}'?" if near else ""
        raise RecipeError(
            f"{where}: unknown stage '{name}'.{hint} Available stages: {', '.join(sorted(_STAGES))}. "
            "A stage of your own is registered with @register_stage in a module the recipe names "
            "under `plugins:`."
        )
    variants = _STAGES[name]
    if task is None:
        return variants[0]
    specific = [v for v in variants if v.tasks and task.name in v.tasks]
    if specific:
        return specific[0]
    generic = [v for v in variants if v.tasks is None]
    if generic:
        missing = [n for n in generic[0].needs if n not in task.provides]
        if not missing:
            return generic[0]
        raise RecipeError(
            f"{where}: stage '{name}' needs {' and '.join(missing)}, which task '{task.name}' does not "
            f"provide; stages for {task.name}: {', '.join(names_for(task))}."
        )
    tasks = sorted({t for v in variants for t in v.tasks or ()})
    raise RecipeError(
        f"{where}: stage '{name}' works on task {' or '.join(tasks)}, not {task.name}; stages for "
        f"{task.name}: {', '.join(names_for(task))}."
    )


def names_for(task) -> list[str]:
    """The stages a task can use."""
    out = []
    for name, variants in sorted(_STAGES.items()):
        if any(
            (v.tasks and task.name in v.tasks) or (v.tasks is None and set(v.needs) <= set(task.provides))
            for v in variants
        ):
            out.append(name)
    return out


def lowering_conflict(names: list[str], task=None) -> str | None:
    """A message when a stage that changes the model comes after one that lowered it, else None."""
    lowered = None
    for i, name in enumerate(names):
        handler = get_stage(name, task=task)
        if lowered is not None and handler.changes_model:
            j, first = lowered
            return (
                f"stages[{i}] '{name}' changes the model, but stages[{j}] '{first}' already lowered it to the "
                f"runtime artifact that is served from then on, so '{name}' would change a model nobody "
                f"serves and every later number would describe the artifact of '{first}'. Put '{name}' before "
                f"'{first}' (lowering comes last; 'export' may follow it)."
            )
        if handler.lowers and lowered is None:
            lowered = (i, name)
    return None
