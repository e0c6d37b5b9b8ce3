"""Weight-only quantization of Linear layers: round-to-nearest and GPTQ, symmetric or asymmetric,
with one scale (and zero point) per group of input columns.

    grid = Grid(bits=4, group=128, symmetric=True)
    hessians = collect_hessians(model, batches)          # H = 2/n sum x x^T of every Linear's inputs
    report = quantize_weights(model, grid, method="gptq", hessians=hessians)

The model keeps float tensors whose values lie on the integer grid (`Grid.dequantize(Grid.quantize(w))`),
so its outputs are exactly what integer kernels with these scales compute; the scales and integers
are kept on each layer (`layer.torchslim_weight_grid`) for lowering.

GPTQ (Frantar et al., 2022) quantizes one input column at a time and spreads each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs, so
the layer's *outputs* on the calibration data move as little as possible. Options: `damp` (share of
the mean Hessian diagonal added for stability), `act_order` (columns in order of decreasing Hessian
diagonal; group scales are then fixed from the original weights first, so groups stay contiguous
for the kernels), `block` (columns updated together)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.models.transformer import Replay, block_inputs, hidden_states, repeated_blocks, run_hooked
from torchslim.paths import matches

CLIP_LOW = 0.5  # the smallest share of a group's range the clipping search tries
ROWS = 8192  # GPTQ's rows at a time (they are independent): its updates stay in the CPU's caches


@dataclass(frozen=True)
class Grid:
    bits: int = 4
    group: int = 128  # input columns sharing a scale; 0 or -1: one scale per output row
    symmetric: bool = True
    clip: int = 0  # > 0: each group's range shrunk by the best of `clip` factors from 1 down to CLIP_LOW

    @property
    def levels(self) -> tuple[int, int]:
        return (-(2 ** (self.bits - 1)), 2 ** (self.bits - 1) - 1) if self.symmetric else (0, 2**self.bits - 1)

    def params(self, w: torch.Tensor, importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, zero point) per row of `w` (rows x columns of one group): the full range, or with
        `clip`, the shrunk range whose rounding error (each column weighted by `importance`, e.g. its
        input's mean square) is least."""
        scale, zero = self._range(w, 1.0)
        if self.clip <= 0:
            return scale, zero
        weight = torch.ones(w.shape[1]) if importance is None else importance.float()
        best = ((w - self.dequantize(self.quantize(w, scale, zero), scale, zero)) ** 2 * weight).sum(1)
        for factor in torch.linspace(1.0, CLIP_LOW, self.clip + 1)[1:].tolist():
            s, z = self._range(w, factor)
            err = ((w - self.dequantize(self.quantize(w, s, z), s, z)) ** 2 * weight).sum(1)
            better = err < best
            scale, zero, best = torch.where(better, s, scale), torch.where(better, z, zero), torch.minimum(err, best)
        return scale, zero

    def _range(self, w: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self.levels
        if self.symmetric:
            scale = (w.abs().amax(1) * factor).clamp_min(1e-10) / hi
            return scale, torch.zeros_like(scale)
        wmin, wmax = w.amin(1).clamp(max=0) * factor, w.amax(1).clamp(min=0) * factor
        scale = ((wmax - wmin) / (hi - lo)).clamp_min(1e-10)
        return scale, torch.round(-wmin / scale).clamp(lo, hi)

    def quantize(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        lo, hi = self.levels
        return torch.clamp(torch.round(w / scale.unsqueeze(-1)) + zero.unsqueeze(-1), lo, hi)

    def dequantize(self, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        return (q - zero.unsqueeze(-1)) * scale.unsqueeze(-1)

    def width(self, columns: int) -> int:
        """Columns per group for a layer `columns` wide: `group`, or for a narrower layer the smallest
        power of two (16 at least, as the kernels need) that holds the row: the same scales, less padding."""
        if self.group <= 0:
            return columns
        return min(self.group, max(16, 1 << (columns - 1).bit_length()))


def _padded(w: torch.Tensor, g: int) -> torch.Tensor:
    """Columns padded with zeros to whole groups (a zero never changes a group's scale or zero point:
    both grids hold 0 exactly); a layer whose width the group does not divide ends with a short group."""
    extra = -w.shape[1] % g
    return torch.nn.functional.pad(w, (0, extra)) if extra else w


def rtn(
    w: torch.Tensor, grid: Grid, importance: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (integers, scales (rows x groups), zero points) of a (rows x columns) weight;
    `importance` (per column) weights the clipping search's error."""
    g = grid.width(w.shape[1])
    blocks = _padded(w.float(), g).reshape(w.shape[0], -1, g)
    scale, zero = torch.empty(w.shape[0], blocks.shape[1]), torch.empty(w.shape[0], blocks.shape[1])
    weight = None if importance is None else _padded(importance.float()[None], g)[0]
    for b in range(blocks.shape[1]):
        scale[:, b], zero[:, b] = grid.params(blocks[:, b], None if weight is None else weight[b * g : (b + 1) * g])
    q = grid.quantize(blocks, scale, zero).reshape(w.shape[0], -1)[:, : w.shape[1]]
    return q, scale, zero


def dequantized(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, grid: Grid) -> torch.Tensor:
    g = grid.width(q.shape[1])
    blocks = _padded(q.float(), g).reshape(q.shape[0], -1, g)
    return grid.dequantize(blocks, scale, zero).reshape(q.shape[0], -1)[:, : q.shape[1]]


def inverse_cholesky(H: torch.Tensor, damp: float, method: str) -> torch.Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1, as GPTQ and SparseGPT use it."""
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(len(H))
    try:
        return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError:
        raise TorchslimError(
            f"{method}: the layer's input Hessian is not positive definite; raise `damp` or give more calibration data."
        ) from None


def gptq(
    w: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    damp: float = 0.01,
    act_order: bool = False,
    block: int = 128,
    fixed: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ: (integers, scales, zero points) of a (rows x columns) weight given the Hessian of its
    inputs (columns x columns). `fixed`: the (scale, zero) of every group (rows x groups of
    `grid.width` columns) given, e.g. a GGUF type's stored grid (`export.ggml.TypeGrid`, whose
    quantize/dequantize `grid` then is); only the integers are chosen. Rows are independent in GPTQ: a
    tall matrix (an embedding table used as the head) is done `ROWS` rows at a time."""
    if w.shape[0] > ROWS:
        parts = [
            gptq(
                w[i : i + ROWS],
                hessian,
                grid,
                damp,
                act_order,
                block,
                None if fixed is None else (fixed[0][i : i + ROWS], fixed[1][i : i + ROWS]),
            )
            for i in range(0, w.shape[0], ROWS)
        ]
        return tuple(torch.cat([p[k] for p in parts]) for k in range(3))
    W = w.detach().float().clone()
    H = hessian.detach().float().clone()
    rows, cols = W.shape
    g = grid.width(cols)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    order = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    scale, zero = torch.empty(rows, -(-cols // g)), torch.empty(rows, -(-cols // g))
    diag = torch.diag(H).clone()
    if fixed is not None:
        scale, zero = fixed
    elif act_order:  # group scales fixed from the original weights, so each group stays contiguous
        _, scale, zero = rtn(W, grid, diag)
    W, H = W[:, order], H[order][:, order]
    Hinv = inverse_cholesky(H, damp, "GPTQ")
    Q = torch.zeros_like(W)
    for start in range(0, cols, block):
        end = min(start + block, cols)
        W1, Err = W[:, start:end].clone(), torch.zeros(rows, end - start)
        Hinv1 = Hinv[start:end, start:end]
        for i in range(end - start):
            column = int(order[start + i])
            group = column // g
            if fixed is None and not act_order and column % g == 0:  # scales from the weights as GPTQ has updated them
                part = (
                    W1[:, i : i + g] if i + g <= end - start else torch.cat([W1[:, i:], W[:, end : start + i + g]], 1)
                )
                scale[:, group], zero[:, group] = grid.params(part, diag[column : column + part.shape[1]])
            q = grid.quantize(W1[:, i : i + 1], scale[:, group], zero[:, group])[:, 0]
            Q[:, start + i] = q
            err = (W1[:, i] - grid.dequantize(q.unsqueeze(1), scale[:, group], zero[:, group])[:, 0]) / Hinv1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err[:, i] = err
        W[:, end:] -= Err @ Hinv[start:end, end:]
    inverse = torch.argsort(order)
    return Q[:, inverse], scale, zero


def linear_layers(model: nn.Module, skip: Sequence[str] = ("lm_head",)) -> dict[str, nn.Linear]:
    """The Linear layers to quantize: every one but those whose path ends with a name in `skip`
    (the output head, usually tied to the embeddings)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rpartition(".")[2] not in skip}


def output_head(model: nn.Module) -> tuple[str, nn.Linear] | None:
    """(path, layer) of a language model's output head (`get_output_embeddings()`, else a Linear
    named lm_head), or None."""
    for path, module in model.named_modules():
        getter = getattr(module, "get_output_embeddings", None)
        head = getter() if callable(getter) else None
        if isinstance(head, nn.Linear):
            return next(f"{path}.{n}" if path else n for n, m in module.named_modules() if m is head), head
    return next(((n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.endswith("lm_head")), None)


def tied_to_input(model: nn.Module, head: nn.Linear) -> bool:
    """Whether the head's weight is also the input embedding table."""
    return any(isinstance(m, nn.Embedding) and m.weight is head.weight for m in model.modules())


def collect_hessians(
    model: nn.Module, batches: Iterable[tuple], layers: dict[str, nn.Linear], magnitudes: dict | None = None
) -> dict[str, torch.Tensor]:
    """H = 2/n * sum x x^T over every input row x each layer sees on the calibration batches; with a
    `magnitudes` dict, also each input channel's mean |x| into it (one pass for both)."""
    sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in layers.items()}
    absolute = {n: torch.zeros(m.in_features) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name].addmm_(x.T, x)
            if magnitudes is not None:
                absolute[name] += x.abs().sum(0)
            counts[name] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    run_hooked(model, batches, handles)
    if magnitudes is not None:
        magnitudes.update({n: absolute[n] / max(counts[n], 1) for n in layers})
    return {n: 2 * sums[n] / max(counts[n], 1) for n in layers}


def collect_importance(
    model: nn.Module, batches: Iterable[tuple], layers: dict[str, nn.Linear]
) -> dict[str, torch.Tensor]:
    """Per layer, the mean square of each input column over every row it sees on the calibration
    batches — the diagonal of `collect_hessians`' H / 2, what llama.cpp's importance matrix holds —
    keyed by the layer's weight name (`{name}.weight`), as `export.gguf.write_gguf` takes it."""
    sums = {n: torch.zeros(m.in_features) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            sums[name] += (x * x).sum(0)
            counts[name] += x.shape[0]

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    run_hooked(model, batches, handles)
    return {f"{n}.weight": sums[n] / max(counts[n], 1) for n in layers}


def quantize_weights(
    model: nn.Module,
    grid: Grid,
    method: str = "rtn",
    hessians: dict | None = None,
    layers: dict[str, nn.Linear] | None = None,
    **gptq_options,
) -> list[dict]:
    """Quantize the layers' weights in place (float values on the integer grid); returns one record
    per layer (name, shape, and for GPTQ the output error on the calibration data vs round-to-nearest's)."""
    layers = layers if layers is not None else linear_layers(model)
    if method == "gptq" and hessians is None:
        raise TorchslimError("GPTQ needs the layers' input Hessians: collect_hessians(model, batches, layers).")
    return [
        {
            "layer": name,
            **quantize_layer(layer, grid, method, None if hessians is None else hessians[name], **gptq_options),
        }
        for name, layer in layers.items()
    ]


def quantize_layer(
    layer: nn.Linear,
    grid: Grid,
    method: str = "rtn",
    hessian: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    **gptq_options,
) -> dict:
    """One layer's weight (its own, or `weight`: the float original) on `grid`, in place, its integers
    and scales kept for lowering; returns its record (shape, bits, and with a Hessian the output error)."""
    w = (layer.weight if weight is None else weight).detach().float()
    if method == "gptq":
        q, scale, zero = gptq(w, hessian, grid, **gptq_options)
    else:  # with calibration inputs, the clipping search weighs each column by its input's mean square
        q, scale, zero = rtn(w, grid, None if hessian is None else torch.diag(hessian))
    new = dequantized(q, scale, zero, grid)
    record = {"shape": list(w.shape), "bits": grid.bits}
    if hessian is not None:
        record["output_error"] = output_error(w, new, hessian)
    layer.weight.data = new.to(layer.weight.dtype)
    object.__setattr__(layer, "torchslim_weight_grid", (grid, q.to(torch.int8), scale, zero))
    return record


def output_error(w: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """Mean squared change of the layer's outputs on the calibration inputs: tr(D H D^T) / 2 / rows,
    D = new - w (H = 2/n sum x x^T)."""
    d = (new - w).float()
    return float(torch.einsum("ij,jk,ik->", d, hessian, d) / 2 / w.shape[0])


def gptq_sequential(
    model: nn.Module, batches: Iterable[tuple], grid: Grid, skip: Sequence[str] = ("lm_head",), **options
) -> list[dict]:
    """GPTQ block after block, as the method is meant to run: each block's layers see the outputs of
    the blocks before it *as quantized*, so later layers correct for earlier rounding. Layers outside
    the repeated blocks are quantized from the float model's inputs. Returns one record per layer."""
    return blockwise(
        model,
        batches,
        lambda module, layers, hessians: quantize_weights(module, grid, "gptq", hessians, layers, **options),
        skip,
    )


def blockwise(
    model: nn.Module,
    batches: Iterable[tuple],
    change: Callable[[nn.Module, dict, dict], list[dict]],
    skip: Sequence[str] = ("lm_head",),
    ignore: Sequence[str] = (),
) -> list[dict]:
    """Run `change(module, layers, hessians)` (which rewrites the layers' weights in place and returns one
    record per layer, keyed "layer") block after block of a transformer: each block's Hessians come from
    the outputs of the blocks before it *as changed*, so later layers compensate for earlier changes, and
    only one block's inputs are held at a time. Linear layers outside the repeated blocks (but not `skip`)
    are changed first, from the unchanged model's inputs; a model without repeated blocks in one pass.
    `ignore`: module paths or globs (from the model's root) left unchanged."""
    batches = list(batches)
    blocks = repeated_blocks(model)
    if blocks is None:
        layers = {n: m for n, m in linear_layers(model, skip).items() if not matches(n, ignore)}
        return change(model, layers, collect_hessians(model, batches, layers))
    inside = {id(m) for b in blocks for m in b.modules()}
    outside = {n: m for n, m in linear_layers(model, skip).items() if id(m) not in inside and not matches(n, ignore)}
    records = change(model, outside, collect_hessians(model, batches, outside)) if outside else []
    prefix = next(n for n, m in model.named_modules() if m is blocks)
    inputs = block_inputs(model, blocks[0], batches)
    for index, block in enumerate(blocks):
        layers = {n: m for n, m in linear_layers(block, skip).items() if not matches(f"{prefix}.{index}.{n}", ignore)}
        done = change(block, layers, collect_hessians(Replay(block), inputs, layers)) if layers else []
        records += [{**r, "layer": f"{prefix}.{index}.{r['layer']}"} for r in done]
        with torch.no_grad():  # the next block's inputs: this block's outputs, changed
            inputs = [((hidden_states(block(*args, **kwargs)),) + tuple(args[1:]), kwargs) for args, kwargs in inputs]
    return records
