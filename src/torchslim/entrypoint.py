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
        raise RecipeError(f"{field}: cannot import module '{module_name}' ({exc}). Make sure it is installed "
                          "or sits next to the recipe file.") from None
    finally:
        if added:
            sys.path.remove(str(search_dir))
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RecipeError(f"{field}: module '{module_name}' has no callable '{func_name}'.")
    return func
