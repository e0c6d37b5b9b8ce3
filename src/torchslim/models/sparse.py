"""Sparse storage, and the reader of every torchslim safetensors file (dense or sparse; a tied weight
is stored once). A weight tensor that is mostly zeros is written as a bitmask of its non-zeros plus
their values. A 90%-sparse float32 tensor takes 10% (values) + 3.1% (one bit per weight) of its
dense bytes, and loads back to the identical dense tensor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from torchslim.io import replacing
from torchslim.models.shapes import SHAPES_KEY, module_shapes

FORMAT_KEY = "torchslim.format"
SPARSE_FORMAT = "bitmask-v1"
TIED_KEY = "torchslim.tied"


def untied_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict with every tensor once, {key: the key it is tied to}): a tied weight (input and
    output embeddings) is stored once and re-tied on load."""
    state, tied, seen = {}, {}, {}
    for k, v in model.state_dict(keep_vars=True).items():
        if id(v) in seen:
            tied[k] = seen[id(v)]
            continue
        seen[id(v)] = k
        state[k] = v.detach().contiguous().cpu()
    return state, tied


def _packs_smaller(t: torch.Tensor, nonzero: torch.Tensor) -> bool:
    packed_bytes = (t.numel() + 7) // 8 + int(nonzero.sum()) * t.element_size()
    return t.is_floating_point() and t.numel() > 64 and packed_bytes < t.numel() * t.element_size()


def worth_storing_sparse(model: nn.Module) -> bool:
    """Whether any weight tensor is sparse enough to take fewer bytes as (bitmask, values)."""
    return any(_packs_smaller(t, t != 0) for t in model.state_dict().values())


def encode(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict]:
    """Each tensor goes dense or as (bitmask, values), whichever is smaller."""
    out, layout = {}, {}
    for key, t in state.items():
        t = t.detach().contiguous().cpu()
        nonzero = t != 0
        if _packs_smaller(t, nonzero):
            bits = np.packbits(nonzero.flatten().numpy())
            out[f"{key}::mask"] = torch.from_numpy(bits)
            out[f"{key}::values"] = t[nonzero].clone()
            layout[key] = list(t.shape)
        else:
            out[key] = t
    return out, layout


def decode(tensors: dict[str, torch.Tensor], layout: dict) -> dict[str, torch.Tensor]:
    state = {k: v for k, v in tensors.items() if "::" not in k}
    for key, shape in layout.items():
        values = tensors[f"{key}::values"]
        numel = int(np.prod(shape)) if shape else 1
        mask = torch.from_numpy(np.unpackbits(tensors[f"{key}::mask"].numpy(), count=numel).astype(bool))
        dense = torch.zeros(numel, dtype=values.dtype)
        dense[mask] = values
        state[key] = dense.reshape(shape)
    return state


def save_sparse(model: nn.Module, path: Path) -> Path:
    state, tied = untied_state(model)
    tensors, layout = encode(state)
    metadata = {
        FORMAT_KEY: SPARSE_FORMAT,
        "torchslim.sparse_layout": json.dumps(layout),
        SHAPES_KEY: json.dumps(module_shapes(model)),
        TIED_KEY: json.dumps(tied),
    }
    path = Path(path)
    with replacing(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(dense state dict, metadata) of a torchslim safetensors file, sparse or dense."""
    with safe_open(str(path), "pt") as fh:
        meta = fh.metadata() or {}
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if meta.get(FORMAT_KEY) == SPARSE_FORMAT:
        tensors = decode(tensors, json.loads(meta["torchslim.sparse_layout"]))
    return tensors, meta
