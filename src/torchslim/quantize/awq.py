"""Activation-aware weight scaling (AWQ, Lin et al., 2023) before rounding.

A Linear layer's input channels that carry large activations matter most to its outputs, yet a
group's scale is set by its largest *weights*. Multiplying those columns by s > 1 (and dividing the
channel by s where it is produced) leaves the float model's function unchanged but gives the
important weights more of the grid. Per group of layers reading one tensor, s = mean|x|^alpha,
alpha chosen from a grid by the least output error of the rounded layers on the calibration inputs.

    folds = find_folds(model, batch, layers)                 # who produces each layer's input
    records = awq_scale(model, batches, grid, layers)        # search s and fold it in, in place
    records = smooth_scale(model, batches, layers, alpha=0.5)   # SmoothQuant, for int8 activations

Where s goes is found, not assumed: one forward pass records which module's output tensor each
Linear reads (a norm or a Linear: LayerNorm, RMSNorm with `weight` or `1 + weight`, ...); a layer
whose input is computed (an MLP's down projection reads act(gate) * up) tries the sibling Linear
layers of the right width. Every fold is checked on a short batch: a test scale folded in must leave
the model's outputs unchanged, or the fold is dropped (an activation between the two, an attention
softmax, a weight tied elsewhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from torchslim.models.transformer import run_hooked
from torchslim.quantize.weights import Grid, collect_hessians, dequantized, output_error, rtn


@dataclass
class Fold:
    producer: str  # module path of a norm or Linear whose output channels are divided by s
    consumers: list[str]  # Linear layers reading that output, whose input columns are multiplied by s
    offset: float = 0.0  # a norm computing x * (offset + weight)


def _first_tensor(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return next(_first_tensor(o) for o in (out.values() if isinstance(out, dict) else out))


def _short(batch: tuple, tokens: int = 8) -> tuple:
    """One example of a batch; token ids and masks (2-D integer tensors) cut to `tokens`."""

    def cut(t):
        if not isinstance(t, torch.Tensor):
            return t
        t = t[:1]
        return t[:, :tokens] if t.dim() == 2 and not t.is_floating_point() else t

    return tuple(cut(t) for t in batch)


def _elementwise(module: nn.Module) -> bool:
    """A module whose only parameters are a per-channel `weight` (and `bias`): a norm's affine part."""
    params = dict(module.named_parameters(recurse=False))
    return (
        not list(module.children())
        and "weight" in params
        and params["weight"].dim() == 1
        and set(params) <= {"weight", "bias"}
    )


class _Scaler:
    """Folds per-channel scales between a producer and its consumers, undoably."""

    def __init__(self, model: nn.Module):
        self.modules = dict(model.named_modules())

    def params(self, fold: Fold) -> list[torch.Tensor]:
        mods = [self.modules[fold.producer]] + [self.modules[c] for c in fold.consumers]
        return [p for m in mods for p in m.parameters(recurse=False)]

    @torch.no_grad()
    def apply(self, fold: Fold, s: torch.Tensor) -> None:
        producer = self.modules[fold.producer]
        if isinstance(producer, nn.Linear):
            producer.weight.div_(s.to(producer.weight.dtype).unsqueeze(1))
        else:
            w = producer.weight
            w.copy_((fold.offset + w.float()) / s - fold.offset)
        if getattr(producer, "bias", None) is not None:
            producer.bias.div_(s.to(producer.bias.dtype))
        for name in fold.consumers:
            layer = self.modules[name]
            layer.weight.mul_(s.to(layer.weight.dtype))


def _consumer_inputs(model: nn.Module, batch: tuple, layers: dict[str, nn.Linear]):
    """One forward pass: for each tensor read by Linear layers in `layers`, its readers (in order), and
    every module whose output it is (innermost first)."""
    readers: dict[int, list[str]] = {}
    makers: dict[int, list[str]] = {}
    alive: list[torch.Tensor] = []  # keeps ids unique while the pass runs

    def read(path):
        def hook(module, args):
            alive.append(args[0])
            readers.setdefault(id(args[0]), []).append(path)

        return hook

    def made(path):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor):
                alive.append(out)
                makers.setdefault(id(out), []).append(path)

        return hook

    handles = [m.register_forward_pre_hook(read(p)) for p, m in model.named_modules() if p in layers]
    handles += [m.register_forward_hook(made(p)) for p, m in model.named_modules() if p]
    try:
        with torch.no_grad():
            model(*batch)
    finally:
        for h in handles:
            h.remove()
    return [(list(dict.fromkeys(names)), makers.get(key, [])) for key, names in readers.items()]


def find_folds(model: nn.Module, batch: tuple, layers: dict[str, nn.Linear], seed: int = 0) -> list[Fold]:
    """Every (producer, consumers) pair whose scaling provably leaves `model`'s outputs unchanged on
    `batch` (a short piece of it is used)."""
    batch = _short(batch)
    modules = dict(model.named_modules())
    scaler = _Scaler(model)
    with torch.no_grad():
        reference = _first_tensor(model(*batch)).float()
    tolerance = 1e-4 * float(reference.abs().max()) + 1e-5
    generator = torch.Generator().manual_seed(seed)

    def holds(fold: Fold, width: int) -> bool:
        saved = [p.detach().clone() for p in scaler.params(fold)]
        scaler.apply(fold, 0.5 + 1.5 * torch.rand(width, generator=generator))
        with torch.no_grad():
            out = _first_tensor(model(*batch)).float()
        with torch.no_grad():
            for p, v in zip(scaler.params(fold), saved):
                p.copy_(v)
        return out.shape == reference.shape and float((out - reference).abs().max()) <= tolerance

    folds = []
    for consumers, makers in _consumer_inputs(model, batch, layers):
        width = layers[consumers[0]].in_features
        candidates = []
        for m in makers:  # the tensor's own producer: a Linear, or a norm (x * w, or x * (1 + w))
            module = modules[m]
            if isinstance(module, nn.Linear) and module.out_features == width:
                candidates.append(Fold(m, consumers))
            elif _elementwise(module) and module.weight.numel() == width:
                candidates += [Fold(m, consumers, 0.0), Fold(m, consumers, 1.0)]
        if not makers:  # a computed input: a sibling Linear of that width (an MLP's up projection)
            parent = consumers[0].rpartition(".")[0]
            candidates = [
                Fold(n, consumers)
                for n, m in modules.items()
                if isinstance(m, nn.Linear)
                and n.rpartition(".")[0] == parent
                and n not in consumers
                and m.out_features == width
            ]
        fold = next((f for f in candidates if holds(f, width)), None)
        if fold is not None:
            folds.append(fold)
    return folds


def input_peaks(model: nn.Module, batches: Iterable[tuple], layers: dict[str, nn.Linear]) -> dict[str, torch.Tensor]:
    """max |x| per input channel of each layer over the calibration batches."""
    peaks = {n: torch.zeros(m.in_features) for n, m in layers.items()}

    def hook(name):
        def record(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float().abs()
            torch.maximum(peaks[name], x.amax(0), out=peaks[name])

        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in layers.items()]
    run_hooked(model, batches, handles)
    return peaks


def search_scale(
    weight: torch.Tensor, hessian: torch.Tensor, magnitude: torch.Tensor, grid: Grid, steps: int = 20
) -> tuple[torch.Tensor, float, float]:
    """(s, alpha, error with s / error without) for a (rows x columns) weight: s = magnitude^alpha
    (normalised to a geometric mean of one over its range), alpha in [0, 1) by the least output error
    tr(D H D^T) of the rounded, scaled-back weight."""
    w = weight.float()
    plain = Grid(grid.bits, grid.group, grid.symmetric)  # the clipping search comes after, on the final weights
    base = magnitude.float().clamp_min(1e-4)
    best, best_s, best_alpha, first = None, torch.ones_like(base), 0.0, None
    for alpha in [i / steps for i in range(steps)]:
        s = base**alpha
        s = s / (s.max() * s.min()).sqrt()
        q = dequantized(*rtn(w * s, plain), plain) / s
        err = output_error(w, q, hessian)
        first = err if first is None else first
        if best is None or err < best:
            best, best_s, best_alpha = err, s, alpha
    return best_s, best_alpha, (best / first if first else 1.0)


def awq_scale(
    model: nn.Module,
    batches: Iterable[tuple],
    grid: Grid,
    layers: dict[str, nn.Linear],
    hessians: dict[str, torch.Tensor] | None = None,
    magnitudes: dict[str, torch.Tensor] | None = None,
    steps: int = 20,
) -> list[dict]:
    """Search and fold activation-aware scales for every group of `layers` (paths in `model`) whose
    input producer can take them; the model's float outputs stay the same. `hessians` and `magnitudes`
    (`collect_hessians(model, batches, layers, magnitudes)` on the unscaled model) are collected here
    when not given; given, the Hessians are rescaled in place to the scaled layers' inputs, ready for
    GPTQ or the clipping search. Returns one record per fold."""
    batches = list(batches)
    if not batches:
        return []
    folds = find_folds(model, batches[0], layers)
    if hessians is None or magnitudes is None:
        magnitudes = {}
        hessians = collect_hessians(model, batches, {f.consumers[0]: layers[f.consumers[0]] for f in folds}, magnitudes)
    scaler, modules, records = _Scaler(model), dict(model.named_modules()), []
    for fold in folds:
        reader = fold.consumers[0]
        weight = torch.cat([modules[c].weight.detach() for c in fold.consumers])
        s, alpha, ratio = search_scale(weight, hessians[reader], magnitudes[reader], grid, steps)
        if alpha > 0:
            scaler.apply(fold, s)
            for c in dict.fromkeys(fold.consumers):  # inputs divided by s: H -> H / (s s^T)
                if c in hessians:
                    hessians[c] = hessians[c] / torch.outer(s, s)
        records.append(
            {"producer": fold.producer, "consumers": fold.consumers, "alpha": alpha, "error_vs_unscaled": ratio}
        )
    return records


def smooth_scale(
    model: nn.Module, batches: Iterable[tuple], layers: dict[str, nn.Linear], alpha: float = 0.5
) -> list[dict]:
    """SmoothQuant (Xiao et al., 2023) for int8 activations: each input channel's activation outliers
    moved into the weights, s = max|x|^alpha / max|w|^(1 - alpha), folded where the channel is produced
    (the same folds as AWQ, each checked). Returns one record per fold."""
    batches = list(batches)
    if not batches:
        return []
    folds = find_folds(model, batches[0], layers)
    peaks = input_peaks(model, batches, {f.consumers[0]: layers[f.consumers[0]] for f in folds})
    scaler, modules, records = _Scaler(model), dict(model.named_modules()), []
    for fold in folds:
        peak = peaks[fold.consumers[0]].clamp_min(1e-5)
        weight = torch.cat([modules[c].weight.detach().float() for c in fold.consumers]).abs().amax(0).clamp_min(1e-5)
        s = (peak**alpha / weight ** (1 - alpha)).clamp(1e-4, 1e4)
        scaler.apply(fold, s)
        records.append(
            {
                "producer": fold.producer,
                "consumers": fold.consumers,
                "activation_peak": float(peak.max()),
                "activation_peak_after": float((peak / s).max()),
            }
        )
    return records
