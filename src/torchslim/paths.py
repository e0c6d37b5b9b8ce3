"""The one matcher for "layers to leave alone" (`ignore`) across techniques: a pattern matches a
module path when it is the path, a parent of it (`encoder.layer.0` matches
`encoder.layer.0.attention.self.query`), or a shell glob of it (`*.attention.*`, `head*`)."""

from __future__ import annotations

import difflib
from fnmatch import fnmatchcase
from typing import Iterable

from torchslim.errors import RecipeError


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(
        path == p or path.startswith(p + ".") or (any(c in p for c in "*?[") and fnmatchcase(path, p)) for p in patterns
    )


def unmatched(patterns: Iterable[str], paths: Iterable[str]) -> list[str]:
    """The patterns that match none of `paths`."""
    paths = list(paths)
    return [p for p in patterns if not any(matches(path, [p]) for path in paths)]


def check_patterns(patterns: Iterable[str], paths: Iterable[str], field: str) -> None:
    """A pattern that matches no module path does nothing: an error naming the closest paths. ONNX
    node names (with a '/', e.g. '/fc1/Gemm') are not module paths and are checked where the graph is."""
    paths = [p for p in paths if p]
    missing = [p for p in unmatched(patterns, paths) if "/" not in p]
    if not missing:
        return
    parts = []
    for pattern in missing:
        near = difflib.get_close_matches(pattern, paths, n=3, cutoff=0.5)
        parts.append(f"'{pattern}'" + (f" (closest: {', '.join(near)})" if near else ""))
    shown = ", ".join(paths[:12]) + (", ..." if len(paths) > 12 else "")
    raise RecipeError(
        f"{field}: {', '.join(parts)} match{'es' if len(missing) == 1 else ''} no layer of the model, so "
        f"{'it does' if len(missing) == 1 else 'they do'} nothing. Give a module path, a parent of one or a glob "
        f"such as '*.attention.*'; the model's module paths: {shown}."
    )
