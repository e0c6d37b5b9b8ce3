"""A pruned Hugging Face model keeps its config true where the change is uniform.

When every layer lost the same share (the hidden size is one group across all layers; heads and FFN
neurons go by the same ratio in every layer), the config's widths and head counts are updated, and
the model is checked to be what its own class builds from that config: then `save_pretrained` /
`from_pretrained` round-trip. Otherwise the config is left as it was (the per-layer shapes travel
with torchslim's `save_weights` and `load_weights`) and the plan says so."""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

HEAD_FIELDS = (
    "num_attention_heads",
    "num_key_value_heads",
    "n_head",
    "n_heads",
    "num_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
)
WIDTH_WORDS = (
    "hidden_size",
    "intermediate_size",
    "n_embd",
    "n_inner",
    "d_model",
    "dim",
    "hidden_dim",
    "ffn_dim",
    "encoder_ffn_dim",
    "decoder_ffn_dim",
    "embed_dim",
    "embedding_size",
    "d_ff",
)
UNSET_WIDTHS = ("n_inner", "intermediate_size", "ffn_dim")  # None means "derived"; set it when it changed


def uniform_sizes(before: dict[str, tuple], after: dict[str, tuple]) -> dict[int, int]:
    """Old size -> new size for every size that changed the same way wherever it changed (a size that
    also names something else, such as the number of positions, may stay elsewhere: the rebuild check
    decides)."""
    seen: dict[int, set[int]] = {}
    for key, shape in before.items():
        for old, new in zip(shape, after.get(key, shape)):
            if new != old:
                seen.setdefault(old, set()).add(new)
    return {old: next(iter(new)) for old, new in seen.items() if len(new) == 1}


def candidate(config, sizes: dict[int, int], heads: dict[int, set[int]]) -> dict[str, int]:
    """Config fields to change: widths whose old value changed uniformly, head counts that did."""
    changes = {}
    for name in WIDTH_WORDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value in sizes:
            changes[name] = sizes[value]
    for name in HEAD_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and len(heads.get(value, ())) == 1 and value not in heads[value]:
            changes[name] = next(iter(heads[value]))
    return changes


def _builds_same(model: nn.Module, config) -> bool:
    """Does the model's own class, built from `config`, have exactly the model's tensor shapes?"""
    try:
        with torch.device("meta"):
            fresh = type(model)(config)
    except Exception:
        return False
    mine = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    return mine == {k: tuple(v.shape) for k, v in fresh.state_dict().items()}


def update(
    model: nn.Module, before: dict[str, tuple], heads: dict[int, set[int]], forward: Callable[[nn.Module], torch.Tensor]
) -> str | None:
    """Update `model.config` in place when the pruned widths are uniform and the class rebuilds to the
    same shapes from it (and the model's outputs do not change). Returns a note for the plan, or None
    when the model has no Hugging Face config."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict") or not hasattr(model, "save_pretrained"):
        return None
    after = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if after == before:
        return None
    changes = candidate(config, uniform_sizes(before, after), heads)
    trial = copy.deepcopy(config)
    for name, value in changes.items():
        setattr(trial, name, value)
    if not _builds_same(model, trial):
        trial, changes = _with_unset(model, trial, changes, uniform_sizes(before, after))
    if trial is None:
        return (
            "config left as it was: the pruned widths differ between layers, so the Hugging Face class "
            "cannot rebuild it; reload with torchslim.models.load_weights (shapes are stored with the weights)"
        )
    reference = forward(model)
    if not _rebuilt_agrees(model, trial, reference, forward):
        return (
            "config left as it was: the class built from the updated config computes something else; "
            "reload with torchslim.models.load_weights"
        )
    old = {name: getattr(config, name, None) for name in changes}
    for name, value in changes.items():
        setattr(config, name, value)
    if not _same(reference, forward, model):
        for name, value in old.items():
            setattr(config, name, value)
        return "config left as it was: the model's code reads the changed fields at run time differently"
    return (
        "config updated ("
        + ", ".join(f"{n} {old[n]} -> {v}" for n, v in changes.items())
        + "); save_pretrained / from_pretrained round-trip"
    )


def _with_unset(model, trial, changes, sizes):
    """Widths the config leaves unset (GPT-2's n_inner derives from n_embd) set to each changed size."""
    for name in UNSET_WIDTHS:
        if hasattr(trial, name) and getattr(trial, name) is None:
            for new in sorted(set(sizes.values())):
                setattr(trial, name, new)
                if _builds_same(model, trial):
                    return trial, {**changes, name: new}
            setattr(trial, name, None)
    return None, changes


def _rebuilt_agrees(model: nn.Module, config, reference: torch.Tensor, forward) -> bool:
    """What from_pretrained would build (the class, from the config, with these weights) gives the
    model's outputs."""
    try:
        fresh = type(model)(config).eval()
        fresh.load_state_dict(model.state_dict())
        return torch.allclose(forward(fresh), reference, rtol=1e-4, atol=1e-5)
    except Exception:
        return False


def _same(reference: torch.Tensor, forward, model) -> bool:
    try:
        return torch.equal(reference, forward(model))
    except Exception:
        return False
