"""Depth pruning of a transformer: whole blocks removed, chosen by how little they change the
residual stream on calibration text (ShortGPT's Block Influence: one minus the mean cosine
similarity between a token's hidden state entering and leaving the block).

Works on the repeated blocks of any model (`models.transformer.repeated_blocks`: a decoder's layers);
for a Hugging Face model the config's layer count (and per-layer lists such as Gemma 3's
`layer_types`) and each attention's `layer_idx` (its slot in the key/value cache) follow, so the
smaller model runs, exports with its cache, and round-trips through `save_pretrained`."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models.transformer import hidden_states, model_configs, run_hooked, transformer_blocks

PER_LAYER_CONFIG = ("layer_types",)


def block_influence(model: nn.Module, batches: Iterable[tuple]) -> list[float]:
    """Per block, 1 - mean cosine(hidden in, hidden out) over every calibration token (low: the
    block barely changes the residual stream, the first to go)."""
    blocks = transformer_blocks(model)
    sums, counts = [0.0] * len(blocks), [0] * len(blocks)

    def hook(index):
        def record(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            cos = F.cosine_similarity(x.float(), hidden_states(out).float(), dim=-1)
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


def keep_blocks(model: nn.Module, keep: list[int]) -> nn.Module:
    """Keep the blocks at `keep` (in that order), in place; the config and cache slots follow."""
    blocks = transformer_blocks(model)
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
    for config in model_configs(model):
        before = config.num_hidden_layers
        config.num_hidden_layers = len(keep)
        for key in PER_LAYER_CONFIG:
            values = getattr(config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == before:
                setattr(config, key, [values[i] for i in keep])
    return model


SHORTLIST = 8  # blocks re-tried at each greedy step: the lowest loss when removed alone


@contextmanager
def without_blocks(model: nn.Module, remove: list[int]):
    """The model with the blocks at `remove` taken out (as `keep_blocks` does), put back on exit."""
    blocks = transformer_blocks(model)
    path = next(n for n, m in model.named_modules() if m is blocks)
    owner, _, name = path.rpartition(".")
    parent = model.get_submodule(owner) if owner else model
    slots = [(m, m.layer_idx) for b in blocks for m in b.modules() if isinstance(getattr(m, "layer_idx", None), int)]
    configs = [
        (c, c.num_hidden_layers, {k: getattr(c, k) for k in PER_LAYER_CONFIG if hasattr(c, k)})
        for c in model_configs(model)
    ]
    keep_blocks(model, [i for i in range(len(blocks)) if i not in set(remove)])
    try:
        yield model
    finally:
        setattr(parent, name, blocks)
        for m, index in slots:
            m.layer_idx = index
        for config, count, lists in configs:
            config.num_hidden_layers = count
            for key, value in lists.items():
                setattr(config, key, value)


def loss_without(model: nn.Module, batches: list[tuple], loss_fn: Callable, remove: list[int]) -> float:
    """The mean of `loss_fn(model, batch)` over the batches with the blocks at `remove` taken out."""
    with without_blocks(model, remove), torch.no_grad():
        return sum(float(loss_fn(model, b)[0]) for b in batches) / len(batches)


def least_loss(model: nn.Module, batches: list[tuple], count: int, loss_fn: Callable) -> tuple[list[int], dict]:
    """`count` blocks chosen greedily by the task's loss on the calibration batches (the Shortened
    LLaMA perplexity criterion, made iterative): each step removes the block whose removal, with those
    already removed, raises the loss least, trying the SHORTLIST blocks that cost least alone.
    Returns (the blocks, in model order; a record of the losses)."""
    total = len(transformer_blocks(model))
    if not 0 <= count < total:
        raise TorchslimError(f"cannot remove {count} of {total} blocks: keep at least one.")
    base = loss_without(model, batches, loss_fn, [])
    alone = [loss_without(model, batches, loss_fn, [i]) for i in range(total)]
    removed: list[int] = []
    steps = []
    for step in range(count):
        shortlist = sorted((i for i in range(total) if i not in removed), key=alone.__getitem__)[:SHORTLIST]
        trials = {i: alone[i] if step == 0 else loss_without(model, batches, loss_fn, removed + [i]) for i in shortlist}
        best = min(trials, key=trials.__getitem__)
        removed.append(best)
        steps.append({"removed": best, "loss": trials[best]})
    return sorted(removed), {"loss": base, "loss_alone": alone, "steps": steps}


def remove_blocks(model: nn.Module, remove: list[int]) -> list[int]:
    """Remove the blocks at `remove`, in place; returns the kept indices (of the original model)."""
    keep = [i for i in range(len(transformer_blocks(model))) if i not in set(remove)]
    keep_blocks(model, keep)
    return keep


def _runs(remove: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of removed blocks as (first, last) pairs, in model order."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(remove)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _residual_output(block: nn.Module) -> nn.Linear:
    """The Linear whose output a block adds to the residual stream last (the MLP's down projection)."""
    mlp = getattr(block, "mlp", None)
    down = getattr(mlp, "down_proj", None) or getattr(mlp, "fc2", None) or getattr(mlp, "c_proj", None)
    if not isinstance(down, nn.Linear):
        raise TorchslimError(
            f"a linear bridge folds into the MLP's output projection (mlp.down_proj, fc2 or c_proj); "
            f"{type(block).__name__} has none. Remove the blocks without a bridge (bridge: none)."
        )
    return down


def _adds_to_residual(model: nn.Module, block: nn.Module, down: nn.Linear, batch: tuple) -> bool:
    """Whether the block's output is (something) + down's output, checked on a batch: doubling
    down's output must move the block's output by exactly that output (no norm after the MLP)."""
    seen = {}

    def scaled(factor):
        def hook(module, args, out):
            seen[f"down{factor}"] = out.detach()
            return out * factor

        return hook

    def grab(factor):
        def hook(module, args, kwargs, out):
            seen[f"out{factor}"] = hidden_states(out).detach()

        return hook

    for factor in (1, 2):
        run_hooked(
            model,
            [batch],
            [down.register_forward_hook(scaled(factor)), block.register_forward_hook(grab(factor), with_kwargs=True)],
        )
    moved, expected = (seen["out2"] - seen["out1"]).double(), seen["down1"].double()
    return bool(torch.linalg.vector_norm(moved - expected) <= 1e-3 * torch.linalg.vector_norm(expected) + 1e-6)


def linear_bridges(model: nn.Module, batches: list[tuple], remove: list[int], damp: float = 1e-3) -> list[dict]:
    """Before the blocks at `remove` are taken out, a linear map stands in for each run of them,
    with no parameter added (ReplaceMe, Shopkhoev et al. 2025): for a run [a, b], the block a - 1
    before it outputs y + m, with m its MLP's output; T minimises |y + m·T - h|² over the calibration
    tokens, h the hidden state leaving block b, by least squares (damped by `damp` of the mean
    diagonal of mᵀm), and is folded into that MLP's output projection (W ← Tᵀ·W, bias ← bias·T).
    Runs are fitted in model order, each with the runs before it already bridged and removed. A run
    that starts at the first block has no block before it and is left unbridged. In place; returns
    a record per run: on the first calibration batch, the error of y + m·T against h and that of
    y + m (the plain removal), each relative to |h - y|."""
    blocks = transformer_blocks(model)
    records, done = [], []
    for first, last in _runs(remove):
        if first == 0:
            records.append({"run": [first, last], "skipped": "no block before the run to fold the map into"})
            done.extend(range(first, last + 1))
            continue
        before, after = blocks[first - 1], blocks[last]
        down = _residual_output(before)
        with without_blocks(model, done):
            if not _adds_to_residual(model, before, down, batches[0]):
                raise TorchslimError(
                    f"block {first - 1} ({type(before).__name__}) does not add its MLP's output "
                    "to the residual stream as it is (a norm follows the MLP), so a linear bridge "
                    "cannot be folded into it. Remove the blocks without a bridge (bridge: none)."
                )
            width = down.out_features
            seen: dict = {}

            def grab(key):
                def hook(module, args, *rest):
                    seen[key] = hidden_states(rest[-1]).detach().reshape(-1, width).double()

                return hook

            def hooks():  # the MLP's output, the output of the block before the run, the run's output
                return [
                    down.register_forward_hook(grab("m")),
                    before.register_forward_hook(grab("out"), with_kwargs=True),
                    after.register_forward_hook(grab("h"), with_kwargs=True),
                ]

            gram = torch.zeros(width, width, dtype=torch.float64)
            cross = torch.zeros(width, width, dtype=torch.float64)
            for k, batch in enumerate(batches):
                run_hooked(model, [batch], hooks())
                m, rest = seen["m"], seen["out"] - seen["m"]
                gram += m.T @ m
                cross += m.T @ (seen["h"] - rest)
                if k == 0:  # kept to report the fit's error on the first batch
                    first_batch = (m, rest, seen["h"])
            ridge = damp * gram.diagonal().mean().clamp_min(1e-12)
            T = torch.linalg.solve(gram + ridge * torch.eye(width, dtype=torch.float64), cross)
            m, rest, h = first_batch
            norm = max(float(torch.linalg.vector_norm(h - rest)), 1e-12)
            err = {
                "bridged": float(torch.linalg.vector_norm(rest + m @ T - h)) / norm,
                "plain": float(torch.linalg.vector_norm(rest + m - h)) / norm,
            }
            with torch.no_grad():
                down.weight.copy_((T.T @ down.weight.double()).to(down.weight.dtype))
                if down.bias is not None:
                    down.bias.copy_((down.bias.double() @ T).to(down.bias.dtype))
        records.append({"run": [first, last], "into": first - 1, "error": err["bridged"], "error_plain": err["plain"]})
        done.extend(range(first, last + 1))
    return records
