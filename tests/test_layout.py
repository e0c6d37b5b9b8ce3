"""The architecture as the code imports it: one pipeline, no import cycles through the run path."""

import ast
import collections
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src"


def _name(p: Path) -> str:
    parts = list(p.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in (SRC / "torchslim").rglob("*.py")}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    line: int
    target: str  # the torchslim module imported (`from torchslim.x import sub` names torchslim.x.sub)
    name: str | None  # the name taken from `target`, None when the module itself is imported
    level: str  # "module" (runs at import), "function" (inside a function body) or "typing" (TYPE_CHECKING)
    comment: str  # the comment on the import's line or the line above it


def _absolute(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    if MODULES[module].name != "__init__.py":
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str) -> list[Import]:
    """Every import of a torchslim module in `module`'s source: module level, inside functions (at any
    depth) and under `if TYPE_CHECKING:`; relative imports resolved."""
    lines = MODULES[module].read_text().splitlines()
    found = []

    def comment(node) -> str:
        here = lines[node.lineno - 1].partition("#")[2] if "#" in lines[node.lineno - 1] else ""
        above = lines[node.lineno - 2].strip() if node.lineno > 1 else ""
        return " ".join(c for c in (here, above[1:] if above.startswith("#") else "") if c).strip()

    def visit(node, level):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "function")
            elif isinstance(child, ast.If) and level == "module" and "TYPE_CHECKING" in ast.unparse(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "typing")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), level)
            elif isinstance(child, ast.Import):
                found.extend(
                    Import(module, child.lineno, a.name, None, level, comment(child))
                    for a in child.names
                    if a.name.split(".")[0] == "torchslim"
                )
            elif isinstance(child, ast.ImportFrom):
                base = _absolute(module, child)
                if base.split(".")[0] != "torchslim":
                    continue
                for a in child.names:
                    sub = f"{base}.{a.name}"
                    found.append(
                        Import(module, child.lineno, sub, None, level, comment(child))
                        if sub in MODULES
                        else Import(module, child.lineno, base, a.name, level, comment(child))
                    )
            else:
                visit(child, level)

    visit(ast.parse(MODULES[module].read_text()), "module")
    return found


def _graph(levels=("module", "function")) -> dict[str, set[str]]:
    """Module -> the torchslim modules importing it runs: each imported module and the packages above
    it (their `__init__` runs first), except packages above the importer itself (already running)."""
    graph = collections.defaultdict(set)
    for module in MODULES:
        own = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
        for imp in _imports(module):
            if imp.level in levels:
                parts = imp.target.split(".")
                graph[module] |= {
                    t for t in (".".join(parts[:i]) for i in range(2, len(parts) + 1)) if t in MODULES and t not in own
                }
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), i.e. the import circles."""
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def connect(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            connect(v)
    return circles


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
    for a, b in [
        ("torchslim.pipeline", "torchslim.recipe"),
        ("torchslim.pipeline", "torchslim.registry"),
        ("torchslim.recipe", "torchslim.registry"),
        ("torchslim.train", "torchslim.distributed"),
        ("torchslim.pipeline", "torchslim.auto.planner"),
        ("torchslim.pipeline", "torchslim.report.json"),
    ]:
        assert not (_reaches(graph, a, b) and _reaches(graph, b, a)), f"{a} and {b} import each other"
    for bottom in ("torchslim.log", "torchslim.io", "torchslim.config", "torchslim.errors", "torchslim.paths"):
        assert graph[bottom] <= {"torchslim.errors"}, f"{bottom} should import (almost) nothing of torchslim"


def test_one_pipeline_for_every_task():
    found = subprocess.run(
        ["git", "grep", "-n", r"EncoderContext\|run_embedding\|measure_encoder", "--", "src"],
        cwd=SRC.parent,
        capture_output=True,
        text=True,
    ).stdout
    assert found == ""
    assert not (SRC / "torchslim" / "encoders").exists()


def test_no_import_circles():
    """No circle among the imports that run when a module loads, nor through the imports inside
    functions (a function-level import that closes a circle only hides it)."""
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(MODULES)))
    assert _circles(_graph(("module",))) == []
    assert _circles(_graph(("module", "function"))) == []


def test_no_private_names_imported_across_modules():
    private = [
        f"{i.module}:{i.line} imports {i.name or i.target} from {i.target}"
        for m in MODULES
        for i in _imports(m)
        if any(p.startswith("_") and not p.startswith("__") for p in [i.name or "", i.target.rpartition(".")[2]])
        and i.target != i.module
    ]
    assert private == [], "make these public where they are defined:\n" + "\n".join(private)


def test_function_level_imports_say_why():
    """Imports of torchslim modules belong at the top of the module; one inside a function needs a
    measured reason, written as `# lazy: <why>` on its line or the line above (optional dependency,
    start-up time)."""
    hidden = [
        f"{i.module}:{i.line} {i.target}"
        for m in MODULES
        for i in _imports(m)
        if i.level == "function" and "lazy:" not in i.comment
    ]
    assert hidden == [], "move these to the top of their modules or say why with `# lazy: ...`:\n" + "\n".join(hidden)


def test_lower_folders_never_import_higher_ones():
    """models/, data/, measure/ and export/ sit below the techniques, tasks and the pipeline."""
    lower = ("torchslim.models", "torchslim.data", "torchslim.measure", "torchslim.export")
    allowed = lower + (
        "torchslim.errors",
        "torchslim.log",
        "torchslim.io",
        "torchslim.config",
        "torchslim.paths",
        "torchslim.entrypoint",
        "torchslim.cpu",
        "torchslim.version",
    )
    upward = [
        f"{i.module}:{i.line} -> {i.target}"
        for m in MODULES
        if m.startswith(lower)
        for i in _imports(m)
        if not i.target.startswith(allowed)
    ]
    assert upward == [], "\n".join(upward)


def test_prune_is_split_by_engine():
    prune = SRC / "torchslim" / "prune"
    assert sorted(p.name for p in prune.iterdir() if p.name != "__pycache__") == [
        "__init__.py",
        "graph",
        "sparsity",
        "stage.py",
        "transformer",
    ]


def test_transformer_structure_has_one_home():
    """Blocks, block inputs, hooked calibration runs, config sync and keeping rows/columns are defined
    once, in torchslim.models.transformer, and used from there by prune, quantize and distill."""
    helpers = {
        "repeated_blocks",
        "transformer_blocks",
        "decoder_blocks",
        "block_inputs",
        "run_hooked",
        "hidden_states",
        "model_configs",
        "sync_decoder_config",
        "keep_rows",
        "keep_cols",
    }
    homes = collections.defaultdict(set)
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name.lstrip("_") in helpers:
                homes[node.name.lstrip("_")].add(module)
    assert dict(homes) == {h: {"torchslim.models.transformer"} for h in helpers}


def test_a_stage_reports_only_through_its_typed_result():
    """Stages return a torchslim.results.StageResult (its `info` goes into the report entry); none writes
    into the run context, which only the pipeline sets."""
    writes = []
    for module, path in MODULES.items():
        if module in ("torchslim.pipeline", "torchslim.context"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            targets = (
                node.targets
                if isinstance(node, ast.Assign)
                else [node.target]
                if isinstance(node, (ast.AugAssign, ast.AnnAssign))
                else []
            )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("update", "setdefault", "append", "extend", "pop", "clear")
            ):
                targets = [node.func.value]
            for target in targets:
                while isinstance(target, (ast.Attribute, ast.Subscript)):
                    if (
                        isinstance(target.value, ast.Name)
                        and target.value.id == "ctx"
                        and isinstance(target, ast.Attribute)
                    ):
                        writes.append(f"{module}:{node.lineno} ctx.{target.attr}")
                    target = target.value
    assert writes == []
