"""The one matcher for "layers to leave alone" (`ignore`) across techniques: a pattern matches a
module path when it is the path, a parent of it (`encoder.layer.0` matches
`encoder.layer.0.attention.self.query`), or a shell glob of it (`*.attention.*`, `head*`)."""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Iterable


def matches(path: str, patterns: Iterable[str]) -> bool:
    return any(
        path == p or path.startswith(p + ".") or (any(c in p for c in "*?[") and fnmatchcase(path, p)) for p in patterns
    )
