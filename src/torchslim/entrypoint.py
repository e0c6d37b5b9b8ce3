"""`module:function` entry points: the only recipe fields that import user code."""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path
from typing import Any, Callable

from torchslim.errors import RecipeError

PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def resolve(spec: str, field: str, search_dir: Path | None = None) -> Callable[..., Any]:
    """Import `module:function`. `search_dir` (the recipe's folder) is tried for the module first."""
    if not re.match(PATTERN, spec):
        raise RecipeError(f"{field}: '{spec}' is not an entry point; write it as 'package.module:function'.")
    module_name, func_name = spec.split(":")
    added = False
    if search_dir is not None and str(search_dir) not in sys.path:
        sys.path.insert(0, str(search_dir))
        added = True
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RecipeError(
            f"{field}: cannot import module '{module_name}' ({exc}). Make sure it is installed "
            "or sits next to the recipe file."
        ) from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RecipeError(f"{field}: module '{module_name}' has no callable '{func_name}'.")
    return func


def call_builder(fn: Callable[..., Any], kwargs: dict, field: str) -> Any:
    """Call a model or data builder with the recipe's `kwargs`, checked against its signature first so
    a misspelled key is a recipe error naming it (and the accepted ones), not a TypeError from inside."""
    import difflib
    import inspect

    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to check
        return fn(**kwargs)
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        accepted = [n for n, p in signature.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
        unknown = [k for k in kwargs if k not in accepted]
        hints = [
            f"'{k}' (did you mean '{near[0]}'?)" if (near := difflib.get_close_matches(k, accepted, n=1)) else f"'{k}'"
            for k in unknown
        ]
        what = f"unknown key(s) {', '.join(hints)}" if unknown else str(exc)
        raise RecipeError(
            f"{field}: {what} for {getattr(fn, '__name__', 'the builder')}; it accepts "
            f"{', '.join(accepted) or 'no keyword arguments'}."
        ) from None
    try:
        return fn(**kwargs)
    except TypeError as exc:  # a builder that passes **kwargs on to a class that does not take them
        text = str(exc)
        if "unexpected keyword argument" in text or "multiple values for" in text:
            raise RecipeError(
                f"{field}: {text} (from {getattr(fn, '__name__', 'the builder')} called with "
                f"{kwargs}). Remove or rename that key."
            ) from None
        raise
