"""Capture a model's ATen graph for the dependency analysis, with torch.export (non-strict).

Non-strict export runs the model's Python as written, so Hugging Face modules, item assignment and
control flow that does not depend on data all work; every op it records carries its module path and
source line. A model that cannot be captured is an error naming the module and the construct."""

from __future__ import annotations

import inspect
import sys
import traceback

import torch
from torch import nn

from torchslim.errors import TorchslimError


def _split(example) -> tuple[tuple, dict]:
    if isinstance(example, dict):
        return (), dict(example)
    if isinstance(example, (list, tuple)):
        return tuple(example), {}
    return (example,), {}


def capture(model: nn.Module, example) -> torch.export.ExportedProgram:
    """The ATen graph of `model` on `example` (its parameters and buffers are graph inputs)."""
    args, kwargs = _split(example)
    if "use_cache" in _parameters(model) and "use_cache" not in kwargs:
        kwargs["use_cache"] = False  # a key/value cache is not part of the computation, and not a tensor
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # keeps fused inference fast paths (opaque to the analysis) out of the graph
            return torch.export.export(model, args, kwargs, strict=False)
    except Exception as exc:  # export raises many types; name the module and the construct
        raise TorchslimError(_explain(model, exc)) from None
    finally:
        model.train(was_training)


def _parameters(model: nn.Module) -> set[str]:
    try:
        return set(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return set()


def _explain(model: nn.Module, exc: Exception) -> str:
    names = {id(m): n for n, m in model.named_modules()}
    module, code = "", ""
    for frame, lineno in traceback.walk_tb(exc.__traceback__ or sys.exc_info()[2]):
        owner = frame.f_locals.get(frame.f_code.co_varnames[0]) if frame.f_code.co_argcount else None
        if isinstance(owner, nn.Module) and id(owner) in names:
            module = names[id(owner)] or "<model>"
            code = f"{frame.f_code.co_filename.rpartition('/')[2]}:{lineno}"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    at = (
        f" in module '{module}' ({type(model.get_submodule(module if module != '<model>' else '')).__name__}, {code})"
        if module
        else ""
    )
    return (
        f"torch.export cannot capture {type(model).__name__}{at}: {type(exc).__name__}: {first}. "
        "Control flow that depends on tensor values cannot be followed: pass example inputs that take the "
        "usual path, or rewrite the branch with torch.where / torch.cond."
    )
