"""Quantization-aware training: fake quantization in the forward pass, straight-through gradients.

Weights are fake-quantized per output channel (symmetric, `weight_bits`) through a parametrization;
optionally their scales are learned (LSQ: Esser et al. 2020). Inputs of every Conv/Linear are
fake-quantized per tensor (`activation_bits`, asymmetric) with moving-average min/max observers that
can be frozen after a set epoch, as can batch-norm statistics. `QATHandle.finish` bakes the quantized
weights into plain float tensors on the integer grid, ready for the same lowering as PTQ
(quantize/static.py). `train_qat` is the quantize stage's `method: qat`: the training run itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

from torchslim.paths import matches

TARGETS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
ATTR = "torchslim_qat"


class WeightFakeQuant(nn.Module):
    def __init__(self, weight: torch.Tensor, bits: int, per_channel: bool = True, learnable: bool = False):
        super().__init__()
        self.qmax, self.per_channel, self.learnable = 2 ** (bits - 1) - 1, per_channel, learnable
        if learnable:
            self.scale = nn.Parameter(self._scale(weight.detach()))

    def _scale(self, w: torch.Tensor) -> torch.Tensor:
        amax = w.abs().flatten(1).amax(1) if self.per_channel else w.abs().amax().reshape(1)
        return (amax / self.qmax).clamp_min(1e-8)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.learnable:
            scale = self.scale if self.per_channel else self.scale.expand(w.shape[0])
            zero = torch.zeros_like(scale)
            grad_factor = 1.0 / (w[0].numel() * self.qmax) ** 0.5
            return torch._fake_quantize_learnable_per_channel_affine(
                w, scale, zero, 0, -self.qmax, self.qmax, grad_factor
            )
        scale = self._scale(w.detach())
        if not self.per_channel:
            scale = scale.expand(w.shape[0])
        zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
        return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -self.qmax, self.qmax)


class ActivationFakeQuant(nn.Module):
    """Per-tensor asymmetric fake quantization with an EMA min/max observer."""

    def __init__(self, bits: int = 8, momentum: float = 0.9):
        super().__init__()
        self.qmin, self.qmax, self.momentum = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1, momentum
        self.register_buffer("lo", torch.tensor(float("inf")))
        self.register_buffer("hi", torch.tensor(float("-inf")))
        self.register_buffer("frozen", torch.tensor(False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and not bool(self.frozen):
            lo, hi = x.detach().min(), x.detach().max()
            first = torch.isinf(self.lo)
            self.lo.copy_(torch.where(first, lo, self.momentum * self.lo + (1 - self.momentum) * lo))
            self.hi.copy_(torch.where(first, hi, self.momentum * self.hi + (1 - self.momentum) * hi))
        if torch.isinf(self.lo):
            return x
        lo, hi = min(float(self.lo), 0.0), max(float(self.hi), 0.0)
        scale = max((hi - lo) / (self.qmax - self.qmin), 1e-8)
        zero = int(round(self.qmin - lo / scale))
        return torch.fake_quantize_per_tensor_affine(
            x, scale, max(self.qmin, min(self.qmax, zero)), self.qmin, self.qmax
        )


@dataclass
class QATHandle:
    model: nn.Module
    layers: list[str]
    hooks: list = field(default_factory=list)
    weight_scales: dict = field(default_factory=dict)

    def freeze_observers(self) -> None:
        for obs in getattr(self.model, ATTR).values():
            obs.frozen.fill_(True)

    def freeze_batch_norm(self) -> None:
        for m in self.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()

    def finish(self) -> dict[str, tuple[float, float]]:
        """Bake the fake-quantized weights, remove observers and hooks; returns the activation ranges
        (the input range of every quantized layer, by module path). The weight scales each layer was
        trained with are left in `weight_scales` (per output channel, by module path)."""
        modules = dict(self.model.named_modules())
        self.weight_scales = {}
        for name in self.layers:
            fq = modules[name].parametrizations.weight[0]
            with torch.no_grad():
                w = modules[name].parametrizations.weight.original
                scale = fq.scale.detach() if fq.learnable else fq._scale(w)
                self.weight_scales[name] = scale.expand(w.shape[0]).clone().float().cpu().tolist()
            parametrize.remove_parametrizations(modules[name], "weight", leave_parametrized=True)
        for h in self.hooks:
            h.remove()
        observers = getattr(self.model, ATTR)
        ranges = {name.replace("__", "."): (float(o.lo), float(o.hi)) for name, o in observers.items()}
        delattr(self.model, ATTR)
        return ranges


def prepare_qat(
    model: nn.Module,
    weight_bits: int = 8,
    activation_bits: int = 8,
    per_channel: bool = True,
    learnable_scales: bool = False,
    exclude: tuple[str, ...] = (),
) -> QATHandle:
    """Insert fake quantization into every Conv/Linear of `model` (in place)."""
    layers = [n for n, m in model.named_modules() if isinstance(m, TARGETS) and not matches(n, exclude)]
    observers = nn.ModuleDict({n.replace(".", "__"): ActivationFakeQuant(activation_bits) for n in layers})
    setattr(model, ATTR, observers)
    handle = QATHandle(model, layers)
    modules = dict(model.named_modules())
    for name in layers:
        m = modules[name]
        parametrize.register_parametrization(
            m, "weight", WeightFakeQuant(m.weight, weight_bits, per_channel, learnable_scales)
        )
        obs = observers[name.replace(".", "__")]
        handle.hooks.append(m.register_forward_pre_hook(lambda mod, args, obs=obs: (obs(args[0]), *args[1:])))
    return handle


def train_qat(model: nn.Module, cfg, ctx) -> dict:
    """The quantize stage's QAT (`cfg`: its QuantizeConfig): train with fake quantization through the one
    training loop (`cfg.finetune`), then bake the quantized weights. Returns the trained layers, their
    activation ranges and weight scales by layer path (for quantize/static.py), and the training's best
    validation metric and history."""
    handle = prepare_qat(
        model, cfg.weight_bits, cfg.activation_bits, cfg.per_channel, cfg.learnable_scales, tuple(cfg.ignore)
    )

    def setup(m, epoch: int) -> None:  # epoch counts from 0; the options count finished epochs
        if cfg.freeze_observers_epoch is not None and epoch >= cfg.freeze_observers_epoch:
            handle.freeze_observers()
        if cfg.freeze_bn_epoch is not None and epoch >= cfg.freeze_bn_epoch:
            handle.freeze_batch_norm()

    tune = cfg.finetune
    result = ctx.fit(model, tune, checkpoint_dir=ctx.stage_dir / "checkpoint", description="qat", epoch_setup=setup)
    model.cpu()
    ranges = handle.finish()
    return {
        "layers": handle.layers,
        "activation_ranges": ranges,
        "weight_scales": handle.weight_scales,
        "best_val_metric": result.best_metric,
        "history": result.history,
    }
