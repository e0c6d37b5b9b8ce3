"""Structured pruning: remove whole channels, neurons and attention heads from the tensors.

    model = torchslim.prune.structured(model, example_inputs, ratio=0.5)

Analysis (graph.py) finds coupled channels, a criterion (importance.py) scores them, this module
decides how many go from each group, and surgery.py cuts every layer the decision touches."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.prune import graph as graph_mod
from torchslim.prune.attention import convert_attention
from torchslim.paths import matches
from torchslim.prune.importance import CRITERIA, PRODUCING, head_scores
from torchslim.prune.surgery import cut


@dataclass
class Group:
    """Channels that must be removed together: one root per channel, and where each root appears."""
    producers: tuple[str, ...]
    roots: list[int]
    members: list = field(default_factory=list)  # (module, role, [positions per root])
    blocks: list[int] | None = None  # block index per root, when a constraint needs equal removal
    n_blocks: int = 1
    remove: list[int] = field(default_factory=list)  # indices into roots


@dataclass
class Plan:
    groups: list[Group]
    heads: dict[str, list[int]]  # attention module -> heads to keep
    head_counts: dict[str, int]
    notes: list[str]
    uses: list = field(default_factory=list)


def _groups(g: graph_mod.Graph, ignore: Sequence[str]) -> list[Group]:
    modules = dict(g.model.named_modules())
    use_roots = [(u, [g.find(s) for s in u.slots]) for u in g.uses]
    ignored = lambda name: matches(name, ignore)  # noqa: E731
    blocked = g.blocked_roots()
    producers: dict[int, set[str]] = {}
    for use, roots in use_roots:
        for r in roots:
            if use.role in PRODUCING:
                producers.setdefault(r, set()).add(use.module)
            if ignored(use.module) and use.role in PRODUCING:
                blocked.add(r)
    for c in g.constraints:  # constraints spanning several groups cannot be honoured: keep those channels
        roots = {g.find(s) for s in c.slots}
        if len({frozenset(producers.get(r, ())) for r in roots}) > 1:
            blocked |= roots
            g.notes.append(f"grouped layer couples channels of different groups; {len(roots)} channels kept")
    families: dict[tuple, Group] = {}
    for r, prods in sorted(producers.items()):
        if r not in blocked:
            key = tuple(sorted(prods))
            families.setdefault(key, Group(key, [])).roots.append(r)
    index = {r: (grp, i) for grp in families.values() for i, r in enumerate(grp.roots)}
    for use, roots in use_roots:
        touched = {}
        for pos, r in enumerate(roots):
            if r in index:
                grp, i = index[r]
                touched.setdefault(id(grp), (grp, {}))[1].setdefault(i, []).append(pos)
        for grp, positions in touched.values():
            grp.members.append((modules[use.module], use.role, [positions.get(i, []) for i in range(len(grp.roots))]))
    _attach_blocks(g, families, index)
    return list(families.values())


def _attach_blocks(g, families, index) -> None:
    for c in g.constraints:
        size = len(c.slots) // c.blocks
        for pos, s in enumerate(c.slots):
            r = g.find(s)
            if r in index:
                grp, i = index[r]
                if grp.blocks is None:
                    grp.blocks, grp.n_blocks = [0] * len(grp.roots), c.blocks
                grp.blocks[i] = pos // size


def _keep_count(n: int, ratio: float, min_channels: int, round_to: int, n_blocks: int) -> int:
    keep = max(min(n, min_channels), n - int(round(ratio * n)))
    step = math.lcm(max(round_to, 1), n_blocks)
    if keep % step:
        keep = min(n, (keep // step + 1) * step)
    return keep


def _choose(group: Group, scores: torch.Tensor, keep: int) -> list[int]:
    n = len(group.roots)
    if group.blocks is None:
        return sorted(torch.argsort(scores)[: n - keep].tolist())
    per_block = (n - keep) // group.n_blocks
    removed = []
    for b in range(group.n_blocks):
        members = [i for i in range(n) if group.blocks[i] == b]
        order = sorted(members, key=lambda i: float(scores[i]))
        removed += order[:per_block]
    return sorted(removed)


def _ratio_for(group: Group, ratio: float | dict) -> float:
    if isinstance(ratio, dict):
        for name in group.producers:
            if name in ratio:
                return float(ratio[name])
        return float(ratio.get("default", 0.0))
    return float(ratio)


def plan(model: nn.Module, example_inputs: torch.Tensor, ratio: float | dict = 0.5, importance: str | Callable = "l1",
         ignore: Sequence[str] | None = None, global_ranking: bool = False, min_channels: int = 1,
         round_to: int = 1, prune_heads: bool = True, leaf_modules: tuple[type, ...] = ()) -> Plan:
    """Decide what to remove, without touching the model's tensors."""
    criterion = CRITERIA[importance] if isinstance(importance, str) else importance
    g = graph_mod.build(model, example_inputs, tuple(leaf_modules))
    groups = _groups(g, list(ignore or []))
    scores = {id(grp): criterion(grp) for grp in groups}
    if global_ranking and not isinstance(ratio, dict):
        normalised = torch.cat([s / (s.mean() + 1e-12) for s in scores.values()]) if scores else torch.zeros(0)
        threshold = torch.quantile(normalised, float(ratio)) if len(normalised) else 0
        for grp in groups:
            s = scores[id(grp)]
            share = float(((s / (s.mean() + 1e-12)) < threshold).float().mean())
            grp.remove = _choose(grp, s, _keep_count(len(grp.roots), share, min_channels, round_to, grp.n_blocks))
    else:
        for grp in groups:
            keep = _keep_count(len(grp.roots), _ratio_for(grp, ratio), min_channels, round_to, grp.n_blocks)
            grp.remove = _choose(grp, scores[id(grp)], keep)
    heads, counts = {}, {}
    modules = dict(model.named_modules())
    for name in g.attention if prune_heads else []:
        if matches(name, ignore or []):
            continue
        module = modules[name]
        n = module.num_heads
        keep = max(1, n - int(round(_ratio_for(Group((name,), []), ratio) * n)))
        crit = importance if isinstance(importance, str) else "l1"
        order = torch.argsort(head_scores(module, crit), descending=True)[:keep]
        heads[name], counts[name] = sorted(order.tolist()), n
    return Plan(groups, heads, counts, list(g.notes), g.uses)


def apply(model: nn.Module, p: Plan) -> nn.Module:
    """Cut every layer the plan touches; the model is changed in place and returned."""
    names = {id(m): n for n, m in model.named_modules()}
    width = {(u.module, u.role): len(u.slots) for u in p.uses}
    removed: dict[tuple[str, str], set[int]] = {}
    for grp in p.groups:
        for module, role, positions in grp.members:
            bucket = removed.setdefault((names[id(module)], role), set())
            for i in grp.remove:
                bucket.update(positions[i])
    keeps: dict[str, dict[str, list[int]]] = {}
    for (name, role), gone in removed.items():
        if gone:
            keeps.setdefault(name, {})[role] = [i for i in range(width[(name, role)]) if i not in gone]
    heads = {name: kept for name, kept in p.heads.items() if len(kept) < p.head_counts[name]}
    for name in sorted(set(keeps) | set(heads)):
        cut(model.get_submodule(name), keeps.get(name, {}), heads.get(name))
    return model


def taylor_gradients(model: nn.Module, batches: Iterable, loss_fn: Callable, max_batches: int = 4) -> None:
    """Accumulate gradients of the loss over a few batches for the Taylor criterion."""
    model.zero_grad(set_to_none=True)
    model.train()
    for i, batch in enumerate(batches):
        if i >= max_batches:
            break
        loss, _ = loss_fn(model, batch)
        loss.backward()
    model.eval()


def structured(model: nn.Module, example_inputs: torch.Tensor, ratio: float | dict = 0.5,
               importance: str | Callable = "l1", ignore: Sequence[str] | None = None, global_ranking: bool = False,
               min_channels: int = 1, round_to: int = 1, prune_heads: bool = True,
               leaf_modules: tuple[type, ...] = (), data: Iterable | None = None,
               loss_fn: Callable | None = None) -> nn.Module:
    """Remove `ratio` of the channels (and attention heads) of every prunable group, physically.

    `nn.MultiheadAttention` layers are first replaced by the equivalent `Attention` so heads can go.
    The model's inputs and outputs keep their widths; layers in `ignore` (module paths) keep their
    output channels. `importance` is l1, l2, bn_scale, taylor (pass `data` and `loss_fn`) or random."""
    if not 0.0 <= (ratio if not isinstance(ratio, dict) else max(ratio.values(), default=0)) < 1.0:
        raise TorchslimError(f"ratio must be in [0, 1), got {ratio}.")
    if isinstance(importance, str) and importance not in CRITERIA:
        raise TorchslimError(f"unknown importance '{importance}'; choose one of {', '.join(CRITERIA)}.")
    convert_attention(model)
    if importance == "taylor":
        if data is None or loss_fn is None:
            raise TorchslimError("importance 'taylor' needs a few batches: pass data= and loss_fn=.")
        taylor_gradients(model, data, loss_fn)
    model.eval()
    p = plan(model, example_inputs, ratio, importance, ignore, global_ranking, min_channels, round_to,
             prune_heads, leaf_modules)
    apply(model, p)
    model.zero_grad(set_to_none=True)
    return model
