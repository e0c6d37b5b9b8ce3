"""One-shot sparsity from calibration inputs, layer by layer, for language models (and any model whose
Linear layers see real inputs): magnitude, Wanda and SparseGPT, unstructured or N:M.

- magnitude: zero the smallest |w| of each output row;
- Wanda (Sun et al. 2023): score |w_ij| * ||x_j||, the weight times the norm of its input channel over
  the calibration tokens, compared within each output row — no weight update;
- SparseGPT (Frantar & Alistarh 2023): the optimal-brain-surgeon update with the inverse Hessian of
  the layer's inputs — columns processed left to right in blocks, each block's mask chosen by
  w^2 / [H^-1]_jj^2, every pruned weight's error spread over the columns not yet visited.

`prune_sequential` runs a criterion block after block of a transformer, each block calibrated on the
outputs of the blocks before it *as pruned* (as both papers do). The weights stay dense tensors with
zeros; `torchslim.models.sparse.save_sparse` stores them as bitmasks. Dense CPU kernels do not get
faster from zeros."""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.quantize.weights import blockwise, inverse_cholesky, output_error

CRITERIA = ("magnitude", "wanda", "sparsegpt")


def _pattern(sparsity: float | None, n: int | None, m: int | None) -> None:
    if (sparsity is None) == (n is None):
        raise TorchslimError(
            "give either `sparsity` (unstructured, a share of each row) or `n` and `m` (N:M: "
            "n of every m consecutive input weights kept)."
        )
    if sparsity is not None and not 0 <= sparsity < 1:
        raise TorchslimError(f"sparsity must be in [0, 1), got {sparsity}.")
    if n is not None and (m is None or not 0 < n < m):
        raise TorchslimError(f"N:M needs 0 < n < m, got {n}:{m}.")


def keep_mask(
    score: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None
) -> torch.Tensor:
    """True where a weight stays: the highest scores of each row (unstructured: all but `sparsity` of
    it) or of every run of m consecutive columns (N:M: n of them)."""
    _pattern(sparsity, n, m)
    rows, cols = score.shape
    keep = torch.zeros_like(score, dtype=torch.bool)
    if n is not None:
        if cols % m:
            raise TorchslimError(f"N:M with m={m} needs the input width to be a multiple of m; a layer has {cols}.")
        groups = score.reshape(rows, cols // m, m)
        return keep.reshape(rows, cols // m, m).scatter_(2, groups.topk(n, dim=2).indices, True).reshape(rows, cols)
    drop = int(sparsity * cols)
    if drop == 0:
        return ~keep
    return keep.scatter_(1, score.topk(cols - drop, dim=1).indices, True)


def magnitude(
    w: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None
) -> torch.Tensor:
    return w * keep_mask(w.abs(), sparsity, n, m)


def wanda(
    w: torch.Tensor, hessian: torch.Tensor, sparsity: float | None = None, n: int | None = None, m: int | None = None
) -> torch.Tensor:
    """|w| times its input channel's norm (the square root of the Hessian's diagonal, which is the
    channel's mean square up to a constant: the constant does not change a row's ranking)."""
    norms = torch.diag(hessian).clamp(min=0).sqrt()
    return w * keep_mask(w.abs() * norms[None], sparsity, n, m)


def sparsegpt(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    block: int = 128,
    damp: float = 0.01,
) -> torch.Tensor:
    """The pruned weight, its surviving entries updated to keep the layer's outputs on the calibration
    inputs (Hessian H = 2/n sum x x^T) as close as the pattern allows."""
    _pattern(sparsity, n, m)
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    if n is not None and (cols % m or block % m):
        raise TorchslimError(
            f"N:M with m={m} needs the input width ({cols}) and the block ({block}) to be multiples of m."
        )
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    Hinv = inverse_cholesky(H, damp, "SparseGPT")
    pruned = torch.zeros_like(W, dtype=torch.bool)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        W1, Err = W[:, start:end].clone(), torch.zeros(rows, end - start)
        Hinv1 = Hinv[start:end, start:end]
        d = torch.diag(Hinv1)
        if sparsity is not None:  # the block's mask at once, by the OBS saliency w^2 / [H^-1]_jj^2
            pruned[:, start:end] = ~keep_mask(W1**2 / d[None] ** 2, sparsity)
        for i in range(end - start):
            if n is not None and i % m == 0:  # the next m columns' mask from the weights as updated so far
                pruned[:, start + i : start + i + m] = ~keep_mask(
                    W1[:, i : i + m] ** 2 / d[None, i : i + m] ** 2, None, n, m
                )
            column = W1[:, i]
            target = torch.where(pruned[:, start + i], torch.zeros_like(column), column)
            err = (column - target) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err[:, i] = err
        W[:, start:end] = W1
        W[:, end:] -= Err @ Hinv[start:end, end:]
    W[pruned] = 0
    return W


def prune_layer(
    layer: nn.Linear,
    criterion: str,
    hessian: torch.Tensor | None,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    **options,
) -> dict:
    """One Linear layer pruned in place; returns its record (shape, sparsity reached, and with a
    Hessian the mean squared change of its outputs on the calibration inputs)."""
    w = layer.weight.detach().float()
    if criterion == "magnitude":
        new = magnitude(w, sparsity, n, m)
    elif criterion == "wanda":
        new = wanda(w, hessian, sparsity, n, m)
    elif criterion == "sparsegpt":
        new = sparsegpt(w, hessian, sparsity, n, m, **options)
    else:
        raise TorchslimError(f"unknown sparsity criterion '{criterion}': use one of {', '.join(CRITERIA)}.")
    record = {"shape": list(w.shape), "sparsity": float((new == 0).float().mean())}
    if hessian is not None:
        record["output_error"] = output_error(w, new, hessian)
    layer.weight.data = new.to(layer.weight.dtype)
    return record


def prune_sequential(
    model: nn.Module,
    batches: Iterable[tuple],
    criterion: str,
    sparsity: float | None = None,
    n: int | None = None,
    m: int | None = None,
    skip: Sequence[str] = ("lm_head",),
    ignore: Sequence[str] = (),
    **options,
) -> list[dict]:
    """Every Linear layer of `model` but `skip` (last names) and `ignore` (paths or globs) pruned by
    `criterion` on the calibration batches, block after block (see `torchslim.quantize.weights.blockwise`);
    one record per layer."""
    _pattern(sparsity, n, m)
    if criterion not in CRITERIA:
        raise TorchslimError(f"unknown sparsity criterion '{criterion}': use one of {', '.join(CRITERIA)}.")
    return blockwise(
        model,
        batches,
        lambda module, layers, hessians: [
            {"layer": name, **prune_layer(layer, criterion, hessians[name], sparsity, n, m, **options)}
            for name, layer in layers.items()
        ],
        skip,
        ignore,
    )
