"""Build the recipe's model and move weights in and out without executing code on load."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from torchslim.entrypoint import call_builder, resolve
from torchslim.errors import RecipeError, TorchslimError
from torchslim.io import replacing
from torchslim.log import warn
from torchslim.models.shapes import SHAPES_KEY, apply_shapes, module_shapes
from torchslim.models.sparse import TIED_KEY, read, untied_state
from torchslim.models.zoo import MODELS


def build_model(spec, num_classes: int | None = None, search_dir: Path | None = None) -> nn.Module:
    """`spec` is the recipe's ModelSpec: a built-in name or an entry point, plus an optional checkpoint."""
    if spec.builtin is not None:
        kwargs = dict(spec.kwargs)
        if num_classes is not None:
            kwargs.setdefault("num_classes", num_classes)
        model = call_builder(MODELS[spec.builtin], kwargs, "model.kwargs")
    else:
        model = call_builder(resolve(spec.entrypoint, "model.entrypoint", search_dir), spec.kwargs, "model.kwargs")
        if not isinstance(model, nn.Module):
            raise RecipeError(
                f"model.entrypoint '{spec.entrypoint}' returned {type(model).__name__}, expected a torch.nn.Module."
            )
    if spec.checkpoint is not None:
        path = (
            spec.checkpoint if spec.checkpoint.is_absolute() or search_dir is None else (search_dir / spec.checkpoint)
        )
        changes: list[str] = []
        load_weights(model, path if path.exists() else spec.checkpoint, changes)
        if changes:
            warn(
                f"model.checkpoint {spec.checkpoint} has other layer shapes than the model built from the recipe "
                f"(model.kwargs {spec.kwargs or {}}); the checkpoint's shapes are used: {'; '.join(changes[:5])}"
                f"{' …' if len(changes) > 5 else ''}"
            )
    return model


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str] | None = None) -> Path:
    """Write the state dict as safetensors (atomically: a temporary name, then rename), with the
    shape attributes of every layer so a pruned model reloads without re-running the pruning."""
    state, tied = untied_state(model)
    metadata = {**(metadata or {}), SHAPES_KEY: json.dumps(module_shapes(model)), TIED_KEY: json.dumps(tied)}
    with replacing(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)
    return path


def _tie(model: nn.Module, tied: dict[str, str]) -> None:
    """Weights saved once because they were one tensor become one tensor again."""
    for key, source in tied.items():
        src_owner, _, src_name = source.rpartition(".")
        owner, _, name = key.rpartition(".")
        setattr(model.get_submodule(owner), name, getattr(model.get_submodule(src_owner), src_name))


def _check_shapes(model: nn.Module, state: dict, path: Path) -> None:
    """A checkpoint without torchslim's shape records must fit the model as it is: list what differs."""
    own = model.state_dict()
    differ = [
        f"{k} {list(v.shape)} (the model has {list(own[k].shape)})"
        for k, v in state.items()
        if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape
    ]
    if differ:
        raise TorchslimError(
            f"Checkpoint {path} does not fit the model: {len(differ)} tensor(s) differ in shape: "
            f"{'; '.join(differ[:8])}{' ...' if len(differ) > 8 else ''}. It carries no torchslim layer-shape "
            "records, so nothing is resized to fit: check model.builtin / model.entrypoint and model.kwargs "
            "(a wider or narrower model?), or load a checkpoint torchslim wrote."
        )


def load_weights(model: nn.Module, path: Path, changes: list[str] | None = None) -> nn.Module:
    """Load safetensors, or a state dict through `torch.load(weights_only=True)`; never unpickle code.
    A safetensors file written by torchslim reshapes `model` to the layer shapes recorded with it
    (pruned widths, factorised layers); `changes` collects what was reshaped."""
    path = Path(path)
    if not path.exists():
        raise TorchslimError(f"Checkpoint {path} does not exist.")
    meta: dict = {}
    if path.suffix == ".safetensors":
        try:
            state, meta = read(path)
            shapes = json.loads(meta.get(SHAPES_KEY, "{}"))
        except Exception as exc:  # safetensors raises its own error types for damaged headers
            raise TorchslimError(f"Checkpoint {path} is not a valid safetensors file: {exc}") from None
        tied = json.loads(meta.get(TIED_KEY, "{}"))
        state.update({k: state[source] for k, source in tied.items() if source in state})
        if SHAPES_KEY in meta:  # torchslim recorded the layer shapes: the model takes them
            reshaped = apply_shapes(model, shapes, state)
            if changes is not None:
                changes.extend(reshaped)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise TorchslimError(
                f"Checkpoint {path} was refused: loading it would need to execute code from the pickle "
                f"({str(exc).splitlines()[0]}). Save a plain state dict (`torch.save(model.state_dict(), ...)`) "
                "or a .safetensors file instead."
            ) from None
        except Exception as exc:
            raise TorchslimError(f"Checkpoint {path} cannot be read: {exc}") from None
        if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise TorchslimError(f"Checkpoint {path} holds a {type(state).__name__}, expected a state dict.")
    if SHAPES_KEY not in meta:
        _check_shapes(model, state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise TorchslimError(f"Checkpoint {path} does not fit the model: {exc}") from None
    if path.suffix == ".safetensors":
        _tie(model, tied)
    return model
