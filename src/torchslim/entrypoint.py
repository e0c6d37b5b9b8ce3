"""`module:function` entry points: the only recipe fields that import user code."""

from __future__ import annotations

import ast
import difflib
import importlib
import importlib.util
import inspect
import re
import sys
import sysconfig
import traceback
from pathlib import Path
from typing import Any, Callable

from torchslim.errors import RecipeError, TorchslimError, UserCodeError

PACKAGE = Path(__file__).resolve().parent
# where the interpreter's own modules and installed packages live: their frames are not the user's
LIBRARIES = tuple(
    str(Path(p).resolve()) for p in {sysconfig.get_paths()[k] for k in ("stdlib", "platstdlib", "purelib", "platlib")}
)

PATTERN = r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"


def import_user_module(name: str, what: str, missing: str, search_dir: Path | None = None):
    """Import a module of the user's, `search_dir` (the recipe's folder) first. A module that is not
    there is a RecipeError (`missing`, formatted with `exc`); one that raises while it is imported
    (a syntax error, a dependency of its own missing, its own code) is a UserCodeError about `what`."""
    added = search_dir is not None and str(search_dir) not in sys.path
    if added:
        sys.path.insert(0, str(search_dir))
    _forget_other_copy(name, search_dir)
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if getattr(exc, "name", None) not in (None, name, *name_parents(name)):
            raise UserCodeError(user_code_message(what, exc)) from None
        raise RecipeError(missing.format(exc=exc)) from None
    except TorchslimError:
        raise
    except Exception as exc:  # the module itself raised while it was imported
        raise UserCodeError(user_code_message(what, exc)) from None
    finally:
        if added:
            sys.path.remove(str(search_dir))


def _forget_other_copy(name: str, search_dir: Path | None) -> None:
    """A module of this name already imported from elsewhere (another recipe's folder in the same
    process) is dropped, with its submodules, when the recipe's folder has its own: the recipe's file wins."""
    top = name.split(".")[0]
    loaded = sys.modules.get(top)
    if loaded is None or search_dir is None:
        return
    local = next((p for p in (search_dir / f"{top}.py", search_dir / top / "__init__.py") if p.exists()), None)
    where = getattr(loaded, "__file__", None)
    if local is None or (where is not None and Path(where).resolve() == local.resolve()):
        return
    for key in [k for k in sys.modules if k == top or k.startswith(top + ".")]:
        del sys.modules[key]
    importlib.invalidate_caches()


def resolve(spec: str, field: str, search_dir: Path | None = None) -> Callable[..., Any]:
    """Import `module:function`. `search_dir` (the recipe's folder) is tried for the module first."""
    if not re.match(PATTERN, spec):
        raise RecipeError(f"{field}: '{spec}' is not an entry point; write it as 'package.module:function'.")
    module_name, func_name = spec.split(":")
    module = import_user_module(
        module_name,
        f"{field}: importing module '{module_name}'",
        f"{field}: cannot import module '{module_name}' ({{exc}}). Make sure it is installed or sits next to "
        "the recipe file.",
        search_dir,
    )
    func = getattr(module, func_name, None)
    if not callable(func):
        raise RecipeError(f"{field}: module '{module_name}' has no callable '{func_name}'.")
    return func


def call_builder(fn: Callable[..., Any], kwargs: dict, field: str) -> Any:
    """Call a model or data builder with the recipe's `kwargs`, checked against its signature first so
    a misspelled key is a recipe error naming it (and the accepted ones), not a TypeError from inside."""
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
    except TorchslimError:
        raise
    except TypeError as exc:  # a builder that passes **kwargs on to a class that does not take them
        text = str(exc)
        if "unexpected keyword argument" in text or "multiple values for" in text:
            raise RecipeError(
                f"{field}: {text} (from {getattr(fn, '__name__', 'the builder')} called with "
                f"{kwargs}). Remove or rename that key."
            ) from None
        raise UserCodeError(user_code_message(_builder(fn, field), exc, fn)) from None
    except Exception as exc:
        raise UserCodeError(user_code_message(_builder(fn, field), exc, fn)) from None


def _builder(fn: Callable, field: str) -> str:
    """'the model builder mymodels.build (model.entrypoint)'."""
    owner = field.partition(".")[0]
    return f"the {owner} builder {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))} ({owner})"


def name_parents(module_name: str) -> list[str]:
    parts = module_name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _theirs(filename: str, own: tuple[str, ...]) -> bool:
    path = str(Path(filename).resolve()) if not filename.startswith("<") else filename
    if path.startswith(str(PACKAGE)):
        return False
    return path.startswith(own) or not path.startswith(LIBRARIES)


def user_frames(exc: BaseException, fn: Callable | None = None) -> list[traceback.FrameSummary]:
    """The frames of `exc`'s traceback in the user's own files: not torchslim's, not the standard
    library's or installed packages' (except the package `fn` comes from, if it is installed)."""
    own: tuple[str, ...] = ()
    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is not None and getattr(module, "__file__", None):
        top = sys.modules.get(module.__name__.partition(".")[0])
        root = Path(getattr(top, "__file__", None) or module.__file__).resolve().parent
        own = (str(root),)
    return [f for f in traceback.extract_tb(exc.__traceback__) if _theirs(f.filename, own)]


def user_code_message(what: str, exc: BaseException, fn: Callable | None = None) -> str:
    """'{what} raised ValueError: ...' and the user's frames (file, line, code)."""
    text = str(exc).strip() or "(no message)"
    lines = [f"{what} raised {type(exc).__name__}: {text}"]
    frames = user_frames(exc, fn)
    if frames:
        lines.append("Your code, innermost last:")
        lines += [
            f'  File "{f.filename}", line {f.lineno}, in {f.name}' + (f"\n    {f.line}" if f.line else "")
            for f in frames
        ]
    every = traceback.extract_tb(exc.__traceback__)
    if frames and every and (every[-1].filename, every[-1].lineno) != (frames[-1].filename, frames[-1].lineno):
        lines.append(f"  (raised inside {Path(every[-1].filename).name}, called from the line above)")
    lines.append("Fix the error in that code and run again (with --resume, if a run had started).")
    return "\n".join(lines)


def call_user(fn: Callable[..., Any], *args: Any, what: str, **kwargs: Any) -> Any:
    """Call a function of the user's; an exception it raises becomes a UserCodeError that names
    `what` and shows only the user's frames (a TorchslimError it raises passes through)."""
    try:
        return fn(*args, **kwargs)
    except TorchslimError:
        raise
    except Exception as exc:
        raise UserCodeError(user_code_message(what, exc, fn)) from None


def check_exists(spec: str, field: str, search_dir: Path | None = None) -> None:
    """That `module:function` exists, without importing or running anything: the module's file is
    found (`search_dir` first) and, for a Python source file, defines or imports the name at its top
    level. For `torchslim init`, which writes a recipe and must not run the user's code."""
    if not re.match(PATTERN, spec):
        raise RecipeError(f"{field}: '{spec}' is not an entry point; write it as 'package.module:function'.")
    module_name, func_name = spec.split(":")
    origin = _find_module(module_name, search_dir)
    if origin is None:
        here = f" or in {search_dir}" if search_dir else ""
        raise RecipeError(
            f"{field}: no module '{module_name}' is installed{here}; put {module_name.replace('.', '/')}.py "
            "next to the recipe, or install the package that holds it."
        )
    if origin.suffix != ".py":
        return  # a compiled module: its names are known only once imported
    try:
        tree = ast.parse(origin.read_text(), str(origin))
    except (SyntaxError, ValueError, OSError) as exc:
        raise RecipeError(f"{field}: {origin} cannot be read as Python: {exc}") from None
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    if func_name not in names and "*" not in names:
        near = difflib.get_close_matches(func_name, sorted(names), n=1)
        hint = f" Did you mean '{module_name}:{near[0]}'?" if near else ""
        raise RecipeError(f"{field}: {origin} defines no '{func_name}'.{hint}")


def _find_module(module_name: str, search_dir: Path | None) -> Path | None:
    """The file of `module_name`, found as an import would find it, without importing it."""
    roots = [str(search_dir)] if search_dir is not None else []
    parts = module_name.split(".")
    for root in [*roots, *sys.path]:
        base = Path(root or ".").joinpath(*parts)
        for candidate in (base.with_suffix(".py"), base / "__init__.py"):
            if candidate.is_file():
                return candidate
    try:  # installed packages, namespace packages, compiled modules
        spec = importlib.util.find_spec(parts[0])
        if spec is None:
            return None
        if len(parts) == 1:
            return Path(spec.origin) if spec.origin else None
        for location in spec.submodule_search_locations or []:
            base = Path(location).joinpath(*parts[1:])
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate
    except (ImportError, ValueError):
        return None
    return None
