"""Depth pruning of a transformer: whole blocks removed, chosen by how little they change the
residual stream on calibration text (ShortGPT's Block Influence: one minus the mean cosine
similarity between a token's hidden state entering and leaving the block).

Works on the repeated blocks of any model (`quantize.weights.repeated_blocks`: a decoder's layers);
for a Hugging Face model the config's layer count (and per-layer lists such as Gemma 3's
`layer_types`) and each attention's `layer_idx` (its slot in the key/value cache) follow, so the
smaller model runs, exports with its cache, and round-trips through `save_pretrained`."""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.quantize.weights import _hidden, repeated_blocks, run_hooked

PER_LAYER_CONFIG = ("layer_types",)


def _blocks(model: nn.Module) -> nn.ModuleList:
    blocks = repeated_blocks(model)
    if blocks is None:
        raise TorchslimError("depth pruning needs a model with repeated blocks (a transformer's layers in an "
                             "nn.ModuleList); this model has none.")
    return blocks


def block_influence(model: nn.Module, batches: Iterable[tuple]) -> list[float]:
    """Per block, 1 - mean cosine(hidden in, hidden out) over every calibration token (low: the
    block barely changes the residual stream, the first to go)."""
    blocks = _blocks(model)
    sums, counts = [0.0] * len(blocks), [0] * len(blocks)

    def hook(index):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(x.float(), _hidden(out).float(), dim=-1)
            sums[index] += float(cos.sum())
            counts[index] += cos.numel()
        return record
    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
    run_hooked(model, batches, handles)
    return [1 - s / max(c, 1) for s, c in zip(sums, counts)]


def least_influential(influence: list[float], count: int) -> list[int]:
    """The `count` blocks of lowest influence, in model order."""
    if not 0 <= count < len(influence):
        raise TorchslimError(f"cannot remove {count} of {len(influence)} blocks: keep at least one.")
    return sorted(sorted(range(len(influence)), key=lambda i: influence[i])[:count])


def _configs(model: nn.Module) -> list:
    seen, out = set(), []
    for m in model.modules():
        config = getattr(m, "config", None)
        if config is not None and id(config) not in seen and hasattr(config, "num_hidden_layers"):
            seen.add(id(config))
            out.append(config)
    return out


def keep_blocks(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep the blocks at `keep` (in that order), in place; the config and cache slots follow."""
    blocks = _blocks(model)
    if not keep or any(not 0 <= i < len(blocks) for i in keep):
        raise TorchslimError(f"cannot keep blocks {keep} of a model with {len(blocks)}.")
    path = next(n for n, m in model.named_modules() if m is blocks)
    owner, _, name = path.rpartition(".")
    kept = nn.ModuleList([blocks[i] for i in keep])
    setattr(model.get_submodule(owner) if owner else model, name, kept)
    for index, block in enumerate(kept):
        for m in block.modules():
            if isinstance(getattr(m, "layer_idx", None), int):
                m.layer_idx = index
    for config in _configs(model):
        before = config.num_hidden_layers
        config.num_hidden_layers = len(keep)
        for key in PER_LAYER_CONFIG:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == before:
                setattr(config, key, [values[i] for i in keep])
    return model


def remove_blocks(model: nn.Module, remove: list[int]) -> list[int]:
    """Remove the blocks at `remove`, in place; returns the kept indices (of the original model)."""
    keep = [i for i in range(len(_blocks(model))) if i not in set(remove)]
    keep_blocks(model, keep)
    return keep
