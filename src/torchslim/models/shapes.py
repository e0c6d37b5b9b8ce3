"""Shape attributes of layers, recorded beside the weights so a structurally changed model (pruned
channels, heads, factorised layers) rebuilds from its original architecture without re-running the
code that changed it. Only classes on an allow-list may be swapped in on load; nothing is imported
from a name found in a file."""

from __future__ import annotations

import torch
from torch import nn

from torchslim.errors import TorchslimError

SHAPES_KEY = "torchslim.shapes"

# attributes that define each layer's tensor shapes
SHAPE_ATTRS: dict[type, tuple[str, ...]] = {
    nn.Conv1d: ("in_channels", "out_channels", "groups"),
    nn.Conv2d: ("in_channels", "out_channels", "groups"),
    nn.Conv3d: ("in_channels", "out_channels", "groups"),
    nn.Linear: ("in_features", "out_features"),
    nn.BatchNorm1d: ("num_features",),
    nn.BatchNorm2d: ("num_features",),
    nn.BatchNorm3d: ("num_features",),
    nn.LayerNorm: ("normalized_shape",),
    nn.GroupNorm: ("num_groups", "num_channels"),
    nn.Embedding: ("num_embeddings", "embedding_dim"),
}
# classes a saved model may put in place of the original module (key: the name written to disk); a
# layer class registers itself where it is defined (`register_shape_attrs(cls, attrs, swappable=True)`)
# and `torchslim/__init__.py` imports the modules of the built-in ones (a fixed list, never a name read
# from a file), so they are known before any weights load
SWAPPABLE: dict[str, type] = {}


def register_shape_attrs(cls: type, attrs: tuple[str, ...], swappable: bool = False) -> type:
    SHAPE_ATTRS[cls] = attrs
    if swappable:
        SWAPPABLE[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return cls


def shape_attrs_for(module: nn.Module) -> tuple[str, ...] | None:
    """The registered shape attributes (possibly none: the class itself is the record), or None."""
    for cls in type(module).__mro__:
        if cls in SHAPE_ATTRS:
            return SHAPE_ATTRS[cls]
    return None


def module_shapes(model: nn.Module) -> dict[str, dict]:
    """{module path: {"class": ..., attr: value}} for every layer with shape attributes."""
    out = {}
    for name, module in model.named_modules():
        attrs = shape_attrs_for(module)
        if attrs is not None:
            cls = type(module)
            value = {a: list(v) if isinstance(v := getattr(module, a), tuple) else v for a in attrs}
            out[name] = {"class": f"{cls.__module__}.{cls.__qualname__}", **value}
    return out


def replace_module(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, leaf, new)


def apply_shapes(model: nn.Module, shapes: dict[str, dict], state: dict[str, torch.Tensor]) -> list[str]:
    """Give `model` the recorded layer classes, attributes and tensor shapes, ready for load_state_dict.
    Returns what changed ('features.0.out_channels: 16 -> 24'), so a caller can say so."""
    changes: list[str] = []
    for path, record in shapes.items():  # parents come before their children
        try:
            module = model.get_submodule(path) if path else model
        except AttributeError:
            raise TorchslimError(f"The checkpoint describes a layer '{path}' that the model does not have.") from None
        cls_name = record["class"]
        if f"{type(module).__module__}.{type(module).__qualname__}" != cls_name:
            if cls_name not in SWAPPABLE:
                raise TorchslimError(
                    f"The checkpoint puts a {cls_name} at '{path}', which torchslim does not "
                    "rebuild; only its own layer types can be swapped in on load."
                )
            module = SWAPPABLE[cls_name].empty_like(module)
            replace_module(model, path, module)
            changes.append(f"{path}: {cls_name.rpartition('.')[2]}")
        for attr, value in record.items():
            if attr != "class":
                value = tuple(value) if isinstance(value, list) else value
                if getattr(module, attr, value) != value:
                    changes.append(f"{path}.{attr}: {getattr(module, attr)} -> {value}")
                setattr(module, attr, value)
    names = {n for n, _ in model.named_modules()}
    missing = sorted({k.rpartition(".")[0] for k in state} - names - {""})
    if missing:
        raise TorchslimError(
            f"The checkpoint holds weights for layers the model does not have: "
            f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''}. Is it the checkpoint of "
            "another architecture? Check model.builtin / model.entrypoint and model.kwargs."
        )
    for key, tensor in state.items():
        owner_path, _, name = key.rpartition(".")
        owner = model.get_submodule(owner_path) if owner_path else model
        current = getattr(owner, name, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            fresh = torch.empty(tensor.shape, dtype=current.dtype)
            if isinstance(current, nn.Parameter):
                setattr(owner, name, nn.Parameter(fresh, requires_grad=current.requires_grad))
            else:
                owner.register_buffer(name, fresh)
    return changes
