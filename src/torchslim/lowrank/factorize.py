"""Low-rank factorisation of a model's Linear and Conv2d layers.

Linear layers (and 1x1 or, on request, any groups=1 convolution) get a truncated SVD; k x k
convolutions get Tucker-2 (HOSVD of the channel modes). Ranks come from a ratio of the full rank,
from the kept singular-value energy, from an explicit per-layer table, or from a whole-model budget
of parameters or multiply-adds: one energy level for every layer, the highest whose ranks fit the
budget. A layer whose factorised form would not be cheaper in both parameters and multiply-adds
stays dense, and the notes say so.

Activation-aware (for language models, from calibration inputs): a Linear layer's weight W is
factorised as W·S, then S⁻¹ folded into the first factor, so truncation drops what matters least for
the inputs the layer really sees. `scale` (ASVD, Yuan et al. 2023): S = diag(mean|x|^alpha);
`whiten` (SVD-LLM, Wang et al. 2024): S the Cholesky factor of the inputs' second moment XᵀX/n, for
which the truncation error is exactly the output error on the calibration inputs, so the rank-r
result has the least output error there. Spectra (hence ranks by energy) are those of W·S."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.lowrank.layers import FACTORED, LowRankConv2d, LowRankLinear, TuckerConv2d
from torchslim.models.attention import Attention
from torchslim.models.shapes import replace_module
from torchslim.paths import matches
from torchslim.quantize.weights import collect_hessians


@dataclass
class Layer:
    """One factorisable layer and the spectra its ranks are chosen from."""

    path: str
    module: nn.Module
    kind: str  # "svd" (Linear or conv as a matrix) or "tucker"
    spectra: list[torch.Tensor]  # squared singular values per factorised mode, descending
    pos_in: int  # spatial positions (or tokens) per example at the input and the output
    pos_out: int
    ranks: tuple[int, ...] = ()
    notes: list[str] = field(default_factory=list)
    inputs: tuple[torch.Tensor, torch.Tensor] | None = None  # activation-aware: (S, S^-1), W·S is factorised

    @property
    def full(self) -> tuple[int, ...]:
        return tuple(len(s) for s in self.spectra)

    def _dims(self):
        w = self.module.weight
        k = w[0, 0].numel() if w.dim() == 4 else 1
        return w.shape[1], w.shape[0], k  # in, out, kernel elements

    def dense_cost(self) -> tuple[int, int]:
        """(parameters, multiply-adds per example) of the dense layer."""
        i, o, k = self._dims()
        bias = o if self.module.bias is not None else 0
        return i * o * k + bias, self.pos_out * i * o * k

    def cost(self, ranks: tuple[int, ...]) -> tuple[int, int]:
        i, o, k = self._dims()
        bias = o if self.module.bias is not None else 0
        if self.kind == "svd":
            (r,) = ranks
            return r * (i * k + o) + bias, self.pos_out * r * (i * k + o)
        r_in, r_out = ranks
        params = i * r_in + r_in * r_out * k + r_out * o
        return params + bias, self.pos_in * i * r_in + self.pos_out * (r_in * r_out * k + r_out * o)

    def cheaper(self, ranks: tuple[int, ...]) -> bool:
        (p, f), (dp, df) = self.cost(ranks), self.dense_cost()
        return p < dp and f < df


def input_transforms(
    model: nn.Module, layers: dict[str, nn.Linear], batches, kind: str, alpha: float = 0.5, damp: float = 0.01
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(S, S⁻¹) per Linear layer from its inputs on the calibration batches: diag(mean|x|^alpha)
    (`scale`) or the lower Cholesky factor of XᵀX/n, damped by `damp` of its mean diagonal (`whiten`)."""
    magnitudes: dict = {}
    hessians = collect_hessians(model, batches, layers, magnitudes)
    out = {}
    for name, h in hessians.items():
        if kind == "scale":
            s = magnitudes[name].clamp_min(1e-6) ** alpha
            s = s / s.mean()  # only the direction matters; keep the factors' magnitudes ordinary
            out[name] = (torch.diag(s), torch.diag(1 / s))
        else:
            h = h.double() / 2
            h += damp * h.diagonal().mean().clamp_min(1e-12) * torch.eye(len(h), dtype=h.dtype)
            lower = torch.linalg.cholesky(h)
            eye = torch.eye(len(h), dtype=h.dtype)
            out[name] = (lower.float(), torch.linalg.solve_triangular(lower, eye, upper=False).float())
    return out


def candidates(model: nn.Module, layers: str = "all", ignore=()) -> dict[str, nn.Module]:
    """Every Linear / groups=1 Conv2d that may be replaced: not inside attention modules (which read
    their projections' weights directly), not already factorised, not in `ignore`, and not holding a
    weight used twice (a head tied to the embedding stays whole)."""
    skip_parents = (nn.MultiheadAttention, Attention, *FACTORED)
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    found: dict[str, nn.Module] = {}
    for name, parent in model.named_modules():
        if isinstance(parent, skip_parents):
            continue
        for child_name, m in parent.named_children():
            path = f"{name}.{child_name}" if name else child_name
            if matches(path, ignore) or uses.get(id(getattr(m, "weight", None)), 0) > 1:
                continue
            if (type(m) is nn.Linear and layers in ("all", "linear")) or (
                type(m) is nn.Conv2d and m.groups == 1 and layers in ("all", "conv")
            ):
                found[path] = m
    return found


def find_layers(
    model: nn.Module,
    example: torch.Tensor,
    layers: str = "all",
    conv: str = "tucker",
    ignore=(),
    transforms: dict | None = None,
) -> list[Layer]:
    """The `candidates` on the forward path, with their spectra and positions."""
    found = candidates(model, layers, ignore)
    positions: dict[str, tuple[int, int]] = {}

    def hook(path):
        def fn(module, args, out):
            b = args[0].shape[0]
            channels_in = module.in_features if isinstance(module, nn.Linear) else module.in_channels
            channels_out = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            positions[path] = (args[0].numel() // (b * channels_in), out.numel() // (b * channels_out))

        return fn

    handles = [m.register_forward_hook(hook(p)) for p, m in found.items()]
    try:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            model(*(example if isinstance(example, tuple) else (example,)))
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
    out = []
    for path, m in found.items():
        if path not in positions:
            continue  # not on the forward path
        w = m.weight.detach().float()
        if isinstance(m, nn.Conv2d) and conv == "tucker" and w[0, 0].numel() > 1:
            s_out = torch.linalg.svdvals(w.flatten(1))
            s_in = torch.linalg.svdvals(w.transpose(0, 1).flatten(1))
            out.append(Layer(path, m, "tucker", [s_in**2, s_out**2], *positions[path]))
        else:
            pair = (transforms or {}).get(path) if isinstance(m, nn.Linear) else None
            matrix = w.flatten(1) @ pair[0] if pair is not None else w.flatten(1)
            out.append(Layer(path, m, "svd", [torch.linalg.svdvals(matrix) ** 2], *positions[path], inputs=pair))
    return out


def _rank_for_energy(spectrum: torch.Tensor, energy: float) -> int:
    total = float(spectrum.sum())
    if total == 0:
        return 1
    cumulative = torch.cumsum(spectrum, 0) / total
    return int(torch.searchsorted(cumulative, torch.tensor(min(energy, 1.0) - 1e-7, dtype=cumulative.dtype))) + 1


def _fix(layer: Layer, ranks, min_rank: int, round_to: int) -> tuple[int, ...]:
    out = []
    for r, full in zip(ranks, layer.full):
        r = max(min_rank, int(r))
        r = math.ceil(r / round_to) * round_to
        out.append(min(r, full))
    return tuple(out)


def choose_ranks(
    found: list[Layer],
    model: nn.Module,
    *,
    rank_ratio: float | None = None,
    energy: float | None = None,
    budget: float | None = None,
    budget_on: str = "params",
    ranks: dict | None = None,
    min_rank: int = 1,
    round_to: int = 1,
) -> None:
    """Set `layer.ranks` on each layer (empty: stays dense) and add a note for every skipped layer."""
    if ranks:
        unknown = sorted(set(ranks) - {f.path for f in found})
        if unknown:
            raise TorchslimError(
                f"lowrank.ranks names layers that cannot be factorised here: {', '.join(unknown)}. "
                f"Factorisable layers: {', '.join(f.path for f in found)}."
            )

    def at_energy(layer, e):
        return _fix(layer, [_rank_for_energy(s, e) for s in layer.spectra], min_rank, round_to)

    if budget is not None:
        _fit_budget(found, model, budget, budget_on, at_energy)
        return
    for layer in found:
        if ranks:
            if layer.path not in ranks:
                continue
            value = ranks[layer.path]
            want = tuple(value) if isinstance(value, (list, tuple)) else (value,) * len(layer.full)
            if len(want) != len(layer.full):
                raise TorchslimError(
                    f"lowrank.ranks['{layer.path}'] needs {len(layer.full)} ranks ({layer.kind}), got {list(want)}."
                )
        elif rank_ratio is not None:
            want = tuple(rank_ratio * f for f in layer.full)
        else:
            want = at_energy(layer, energy)
        choice = _fix(layer, want, min_rank, round_to)
        if layer.cheaper(choice):
            layer.ranks = choice
        else:
            (p, f), (dp, df) = layer.cost(choice), layer.dense_cost()
            layer.notes.append(
                f"{layer.path}: rank {list(choice)} of {list(layer.full)} would need {p:,} parameters "
                f"and {f:,} multiply-adds vs {dp:,} and {df:,} dense; kept dense"
            )


def _fit_budget(found, model, budget, budget_on, at_energy) -> None:
    """The highest common energy level whose ranks keep the model within `budget` of its size or MACs."""
    pick = 0 if budget_on == "params" else 1
    dense_total = {f.path: f.dense_cost()[pick] for f in found}
    if budget_on == "params":
        total = sum(p.numel() for p in model.parameters())
    else:
        total = sum(dense_total.values())  # multiply-adds of the factorisable layers are the model's MACs here
    fixed = total - sum(dense_total.values())

    def cost_at(e):
        choices = {}
        for layer in found:
            r = at_energy(layer, e)
            choices[layer.path] = r if layer.cheaper(r) else ()
        spent = fixed + sum(
            layer.cost(choices[layer.path])[pick] if choices[layer.path] else dense_total[layer.path] for layer in found
        )
        return spent, choices

    target = budget * total
    spent, choices = cost_at(0.0)
    if spent > target:
        raise TorchslimError(
            f"lowrank.budget {budget} cannot be met: even the smallest ranks leave "
            f"{spent:,} {budget_on} of {total:,} ({spent / total:.1%}). Raise the budget, lower "
            "min_rank or combine with pruning."
        )
    lo, hi = 0.0, 1.0
    for _ in range(30):
        mid = (lo + hi) / 2
        if cost_at(mid)[0] <= target:
            lo = mid
        else:
            hi = mid
    _, choices = cost_at(lo)
    for layer in found:
        layer.ranks = choices[layer.path]
        if not layer.ranks:
            layer.notes.append(
                f"{layer.path}: at the budget's energy level ({lo:.4f}) the factorised form is not cheaper; kept dense"
            )


def _build(layer: Layer) -> nn.Module:
    m, w = layer.module, layer.module.weight.detach()
    bias = m.bias is not None
    if layer.kind == "tucker":
        r_in, r_out = layer.ranks
        u_out = torch.linalg.svd(w.flatten(1).float(), full_matrices=False)[0][:, :r_out]
        u_in = torch.linalg.svd(w.transpose(0, 1).flatten(1).float(), full_matrices=False)[0][:, :r_in]
        new = TuckerConv2d(m, r_in, r_out, bias)
        core = torch.einsum("oihw,or,is->rshw", w.float(), u_out, u_in)
        new.first.weight.data.copy_(u_in.t().reshape(r_in, -1, 1, 1))
        new.core.weight.data.copy_(core)
        new.last.weight.data.copy_(u_out.reshape(-1, r_out, 1, 1))
        if bias:
            new.last.bias.data.copy_(m.bias.detach())
        return new
    (r,) = layer.ranks
    matrix = w.flatten(1).float()
    if layer.inputs is not None:
        matrix = matrix @ layer.inputs[0]
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    root = s[:r].sqrt()
    first, second = root[:, None] * vh[:r], u[:, :r] * root
    if layer.inputs is not None:
        first = first @ layer.inputs[1]
    if isinstance(m, nn.Linear):
        new = LowRankLinear(m.in_features, m.out_features, r, bias)
        new.first.weight.data.copy_(first)
        new.second.weight.data.copy_(second)
    else:
        new = LowRankConv2d(m, r, bias)
        new.first.weight.data.copy_(first.reshape(r, *w.shape[1:]))
        new.second.weight.data.copy_(second.reshape(*second.shape, 1, 1))
    if bias:
        new.second.bias.data.copy_(m.bias.detach())
    return new.to(w.dtype)


def apply(model: nn.Module, found: list[Layer]) -> list[dict]:
    """Replace every layer with chosen ranks by its factorised form; one record per factorisable layer."""
    records = []
    for layer in found:
        (dp, df) = layer.dense_cost()
        record = {
            "layer": layer.path,
            "kind": layer.kind if layer.ranks else "dense",
            "shape": list(layer.module.weight.shape),
            "full_rank": list(layer.full),
            "rank": list(layer.ranks),
            "params_before": dp,
            "macs_before": df,
        }
        if layer.ranks:
            new = _build(layer)
            dense = layer.module.weight.detach().float()
            record["rel_error"] = float(torch.linalg.norm(_dense_weight(new) - dense) / torch.linalg.norm(dense))
            replace_module(model, layer.path, new)
            record["params_after"], record["macs_after"] = layer.cost(layer.ranks)
        else:
            record["params_after"], record["macs_after"] = dp, df
        records.append(record)
    return records


def _dense_weight(new: nn.Module) -> torch.Tensor:
    """The dense weight a factorised layer computes (for the reconstruction error)."""
    if isinstance(new, TuckerConv2d):
        a, g, b = (c.weight.detach().float() for c in (new.first, new.core, new.last))
        return torch.einsum("or,rshw,si->oihw", b.flatten(1), g, a.flatten(1))
    first, second = new.first.weight.detach().float(), new.second.weight.detach().float()
    return (second.flatten(1) @ first.flatten(1)).reshape(second.shape[0], *first.shape[1:])


def factorize(
    model: nn.Module,
    example: torch.Tensor,
    *,
    layers: str = "all",
    conv: str = "tucker",
    ignore=(),
    activation_aware: str = "none",
    calibration=None,
    alpha: float = 0.5,
    **rank_options,
) -> tuple[list[dict], list[str]]:
    """Factorise `model` in place. Returns (a record per factorisable layer, notes). With
    `activation_aware` `scale` or `whiten`, `calibration` (batches of model inputs) weighs the Linear
    layers' factorisation by their inputs."""
    transforms = None
    if activation_aware != "none":
        if not calibration:
            raise TorchslimError(f"lowrank activation_aware '{activation_aware}' needs calibration batches.")
        linears = {p: m for p, m in candidates(model, layers, ignore).items() if isinstance(m, nn.Linear)}
        transforms = input_transforms(model, linears, calibration, activation_aware, alpha)
    found = find_layers(model, example, layers, conv, ignore, transforms)
    if not found:
        raise TorchslimError(
            "lowrank: the model has no Linear or groups=1 Conv2d layer to factorise (check `layers` and `ignore`)."
        )
    choose_ranks(found, model, **rank_options)
    notes = [n for layer in found for n in layer.notes]
    return apply(model, found), notes
