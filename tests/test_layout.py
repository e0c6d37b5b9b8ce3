"""The architecture as the code imports it: one pipeline, no import cycles through the run path."""

import ast
import collections
import subprocess
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _graph() -> dict[str, set[str]]:
    """Module -> torchslim modules it imports (anywhere in the file, function-level imports included)."""
    def name(p: Path) -> str:
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
    mods = {name(p): p for p in (SRC / "torchslim").rglob("*.py")}
    graph = collections.defaultdict(set)
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torchslim"):
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                graph[mod] |= subs
                if len(subs) < len(node.names) and node.module in mods:
                    graph[mod].add(node.module)
            elif isinstance(node, ast.Import):
                graph[mod] |= {a.name for a in node.names} & mods.keys()
    return graph


def _reaches(graph, start: str, goal: str) -> bool:
    seen, todo = {start}, [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt == goal:
                return True
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return False


def test_the_run_path_has_no_import_cycles():
    graph = _graph()
    for a, b in [("torchslim.pipeline", "torchslim.recipe"), ("torchslim.pipeline", "torchslim.registry"),
                 ("torchslim.recipe", "torchslim.registry"), ("torchslim.train", "torchslim.distributed"),
                 ("torchslim.pipeline", "torchslim.auto.planner"), ("torchslim.pipeline", "torchslim.report.json")]:
        assert not (_reaches(graph, a, b) and _reaches(graph, b, a)), f"{a} and {b} import each other"
    for bottom in ("torchslim.log", "torchslim.io", "torchslim.config", "torchslim.errors", "torchslim.paths"):
        assert graph[bottom] <= {"torchslim.errors"}, f"{bottom} should import (almost) nothing of torchslim"


def test_one_pipeline_for_every_task():
    found = subprocess.run(["git", "grep", "-n", r"EncoderContext\|run_embedding\|measure_encoder", "--", "src"],
                           cwd=SRC.parent, capture_output=True, text=True).stdout
    assert found == ""
    assert not (SRC / "torchslim" / "encoders").exists()
