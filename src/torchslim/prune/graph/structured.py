"""Structured pruning: remove whole channels, neurons and attention heads from the tensors.

    model = torchslim.prune.structured(model, example_inputs, ratio=0.5)

capture.py records the model's ATen graph, dependency.py reads it through one rule per op family
(rules.py) into coupled channels (graph.py), a criterion (importance.py) scores them, this module
decides how many go from each group, and surgery.py cuts every tensor the decision touches."""

from __future__ import annotations

import copy
import math
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.log import console
from torchslim.models import hf_config
from torchslim.models.attention import convert_attention
from torchslim.paths import matches
from torchslim.prune.graph import groups as graph_mod
from torchslim.prune.graph.dependency import build
from torchslim.prune.graph.importance import CRITERIA, PRODUCING
from torchslim.prune.graph.surgery import cut_grouped_columns, cut_tensor, resize, resize_heads


@dataclass
class Group:
    """Channels that must be removed together: one root per channel (or head), and where each root
    appears in every tensor it touches."""

    producers: tuple[str, ...]
    roots: list[int]
    members: list = field(default_factory=list)  # (use, tensor, [positions per root])
    blocks: list[int] | None = None  # block index per root, when a constraint needs equal removal
    n_blocks: int = 1
    remove: list[int] = field(default_factory=list)  # indices into roots
    unit: int = 1  # positions of one root in a producing tensor (a head's size; 1 for a channel)

    @property
    def name(self) -> str:
        return self.producers[0] if self.producers else "?"


@dataclass
class Kept:
    """Channels kept whole, with the first few reasons (module, op and source line)."""

    producers: tuple[str, ...]
    channels: int
    reasons: list[str]


@dataclass
class Plan:
    groups: list[Group]
    kept: list[Kept]
    splits: list = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config: str | None = None  # what became of a Hugging Face model's config

    def summary(self, top: int = 3) -> str:
        """One line per kept group's top reason, most common first."""
        counts: dict[str, int] = {}
        for k in self.kept:
            for r in k.reasons[:1]:
                counts[r] = counts.get(r, 0) + 1
        lines = [f"{len(self.groups)} groups of channels pruned, {len(self.kept)} kept whole"]
        lines += [f"  kept ({n}x): {r}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])[:top]]
        lines += [f"  {self.config}"] if self.config else []
        return "\n".join(lines)


def _root_reasons(g: graph_mod.Graph) -> dict[int, list]:
    out: dict[int, list] = {}
    for r in g.reasons:
        for root in {g.find(s) for s in r.slots}:
            bucket = out.setdefault(root, [])
            if r not in bucket:
                bucket.append(r)
    return out


def _groups(
    g: graph_mod.Graph, ignore: Sequence[str], keep: dict[str, graph_mod.Reason]
) -> tuple[list[Group], list[Kept]]:
    use_roots = [(u, [g.find(s) for s in u.slots]) for u in g.uses]
    blocked, reasons = g.blocked_roots(), _root_reasons(g)
    for use, roots in use_roots:
        owner = next((k for k in keep if use.module == k or use.module.startswith(k + ".")), None)
        for r in roots if owner is not None else ():
            if r not in blocked:
                blocked.add(r)
                reasons.setdefault(r, []).append(keep[owner])
    producers: dict[int, set[str]] = {}
    for use, roots in use_roots:
        if use.role not in PRODUCING:
            continue
        for r in roots:
            producers.setdefault(r, set()).add(use.module)
            if matches(use.module, ignore) and r not in blocked:
                blocked.add(r)
                reasons.setdefault(r, []).append(graph_mod.Reason("listed in `ignore`", use.module, "ignore", ""))
    for slots, _ in g.constraints:  # equal removal per block cannot be honoured across groups: keep those
        roots = {g.find(s) for s in slots}
        if len({frozenset(producers.get(r, ())) for r in roots}) > 1 or roots & blocked:
            why = graph_mod.Reason(
                "equal removal from every block of a grouped layer or an even split "
                "cannot be kept across groups (or part of it is kept)",
                "",
                "grouped",
                "",
            )
            for r in roots - blocked:
                reasons.setdefault(r, []).append(why)
            blocked |= roots
    families: dict[tuple, Group] = {}
    kept: dict[tuple, list[int]] = {}
    for r, prods in sorted(producers.items()):
        key = tuple(sorted(prods))
        if r in blocked:
            kept.setdefault(key, []).append(r)
        else:
            families.setdefault(key, Group(key, [])).roots.append(r)
    _attach_members(g, families, use_roots)
    unbalanced = _attach_blocks(g, families)
    groups = [grp for grp in families.values() if grp not in unbalanced]
    return groups, [Kept(key, len(roots), _reason_texts(roots, reasons)) for key, roots in kept.items()] + [
        Kept(grp.producers, len(grp.roots), ["grouped: channels span the blocks of an even split unevenly"])
        for grp in unbalanced
    ]


def _reason_texts(roots, reasons) -> list[str]:
    texts: list[str] = []
    for r in roots:
        for reason in reasons.get(r, []):
            if reason.text() not in texts:
                texts.append(reason.text())
    return texts[:5] or ["feeds a layer the analysis does not cut"]


def _attach_members(g, families, use_roots) -> None:
    index = {r: (grp, i) for grp in families.values() for i, r in enumerate(grp.roots)}
    tensors = g.tensors
    for use, roots in use_roots:
        touched: dict[int, tuple] = {}
        for pos, r in enumerate(roots):
            if r in index:
                grp, i = index[r]
                touched.setdefault(id(grp), (grp, {}))[1].setdefault(i, []).append(pos)
        for grp, positions in touched.values():
            per_root = [positions.get(i, []) for i in range(len(grp.roots))]
            grp.members.append((use, tensors[use.key], per_root))
            if use.role in PRODUCING:
                grp.unit = max(grp.unit, max(len(p) for p in per_root))


def _attach_blocks(g, families) -> list[Group]:
    """Equal removal per block (grouped convolutions, even channel splits). A group whose channels each
    sit in one block removes the same number from every block; one whose channels (heads) span every
    block evenly keeps the balance whatever goes; anything else is kept whole. Returns those kept."""
    index = {r: (grp, i) for grp in families.values() for i, r in enumerate(grp.roots)}
    unbalanced = []
    for slots, blocks in g.constraints:
        size = len(slots) // blocks
        counts: dict[int, dict[int, list[int]]] = {}
        for pos, s in enumerate(slots):
            r = g.find(s)
            if r in index:
                grp, i = index[r]
                counts.setdefault(id(grp), {}).setdefault(i, [0] * blocks)[pos // size] += 1
        for gid, per_root in counts.items():
            grp = next(v for v in families.values() if id(v) == gid)
            if all(len(set(c)) == 1 for c in per_root.values()):
                continue  # every channel spans all blocks alike
            if all(sum(1 for n in c if n) == 1 for c in per_root.values()):
                if grp.blocks is None:
                    grp.blocks, grp.n_blocks = [0] * len(grp.roots), blocks
                for i, c in per_root.items():
                    grp.blocks[i] = next(b for b, n in enumerate(c) if n)
            elif grp not in unbalanced:
                unbalanced.append(grp)
    return unbalanced


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
        for key, value in ratio.items():
            if key != "default" and (key == group.name or any(matches(p, [key]) for p in group.producers)):
                return float(value)
        return float(ratio.get("default", 0.0))
    return float(ratio)


def plan(
    model: nn.Module,
    example_inputs,
    ratio: float | dict = 0.5,
    importance: str | Callable = "l1",
    ignore: Sequence[str] | None = None,
    global_ranking: bool = False,
    min_channels: int = 1,
    round_to: int = 1,
    prune_heads: bool = True,
) -> Plan:
    """Decide what to remove, without touching the model's tensors. `example_inputs` is a tensor, a
    tuple of positional arguments or a dict of keyword arguments (a Hugging Face model's inputs)."""
    return decide(
        build(model, example_inputs, prune_heads), ratio, importance, ignore, global_ranking, min_channels, round_to
    )


def decide(
    g: graph_mod.Graph,
    ratio: float | dict = 0.5,
    importance: str | Callable = "l1",
    ignore: Sequence[str] | None = None,
    global_ranking: bool = False,
    min_channels: int = 1,
    round_to: int = 1,
    keep: dict[str, graph_mod.Reason] | None = None,
) -> Plan:
    """The plan for a captured graph; every channel any tensor of a module in `keep` touches is kept."""
    criterion = CRITERIA[importance] if isinstance(importance, str) else importance
    groups, kept = _groups(g, list(ignore or []), keep or {})
    scores = {id(grp): criterion(grp) for grp in groups}
    shares = _global_shares(groups, scores, float(ratio)) if global_ranking and not isinstance(ratio, dict) else {}
    for grp in groups:
        share = shares.get(id(grp), _ratio_for(grp, ratio))
        multiple = round_to if grp.unit == 1 else 1  # heads are counted whole, not in vector widths
        keep = _keep_count(len(grp.roots), share, min_channels if grp.unit == 1 else 1, multiple, grp.n_blocks)
        grp.remove = _choose(grp, scores[id(grp)], keep)
    notes = [f"{', '.join(k.producers[:2])}: {k.channels} channels kept ({k.reasons[0]})" for k in kept]
    splits = [graph_mod.HeadSplit(sp.module, [g.find(x) for x in sp.slots], sp.unit) for sp in g.splits]
    return Plan(groups, kept, splits, notes)


def _global_shares(groups, scores, ratio: float) -> dict[int, float]:
    """One threshold over every group's scores, each normalised by its group's mean."""
    if not groups:
        return {}
    normalised = torch.cat([scores[id(g)] / (scores[id(g)].mean() + 1e-12) for g in groups])
    threshold = torch.quantile(normalised, ratio)
    return {id(g): float(((scores[id(g)] / (scores[id(g)].mean() + 1e-12)) < threshold).float().mean()) for g in groups}


def apply(model: nn.Module, p: Plan) -> nn.Module:
    """Cut every tensor the plan touches and update the layers' shape attributes; the model is changed
    in place and returned."""
    removed: dict[tuple[str, int], set[int]] = {}
    grouped: dict[str, tuple[set[int], int]] = {}
    for grp in p.groups:
        for use, _, positions in grp.members:
            gone = {q for i in grp.remove for q in positions[i]}
            if use.role == "grouped_in":
                grouped.setdefault(use.key, (set(), use.groups))[0].update(gone)
            else:
                removed.setdefault((use.key, use.dim), set()).update(gone)
    tensors = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers(remove_duplicate=False))
    changed = {k.rpartition(".")[0] for (k, _), gone in removed.items() if gone} | {
        k.rpartition(".")[0] for k, (gone, _) in grouped.items() if gone
    }
    before = {
        m: {n: tuple(t.shape) for n, t in model.get_submodule(m).named_parameters(recurse=False)} for m in changed
    }
    done: set[int] = set()
    for (key, dim), gone in sorted(removed.items()):
        if gone and (id(tensors[key]), dim) not in done:  # a tied weight is cut once
            done.add((id(tensors[key]), dim))
            cut_tensor(model, key, dim, gone)
    for key, (gone, groups) in grouped.items():
        if gone:
            cut_grouped_columns(model, key, gone, groups)
    _retie(model, tensors)
    for name in sorted(changed):
        resize(model.get_submodule(name), before[name])
    for name in sorted({n for c in changed for n in _ancestors(c)} - changed, key=len, reverse=True):
        resize(model.get_submodule(name), {})  # a layer made of layers (attention) reads its children
    _resize_heads(model, p)
    return model


def _ancestors(path: str) -> list[str]:
    parts = path.split(".")
    return [".".join(parts[:i]) for i in range(len(parts))]


def _retie(model: nn.Module, tensors: dict) -> None:
    """Weights that were one tensor (tied input and output embeddings) stay one tensor."""
    by_id: dict[int, list[str]] = {}
    for key, t in tensors.items():
        by_id.setdefault(id(t), []).append(key)
    current = lambda key: getattr(model.get_submodule(key.rpartition(".")[0]), key.rpartition(".")[2])  # noqa: E731
    for keys in by_id.values():
        fresh = [current(k) for k in keys if current(k) is not tensors[k]]
        if len(keys) > 1 and fresh:
            for key in keys:
                owner, _, name = key.rpartition(".")
                setattr(model.get_submodule(owner), name, fresh[0])


def _resize_heads(model: nn.Module, p: Plan) -> None:
    """Head counts the code reads from attributes; every attribute changes once (query heads first,
    then key/value heads under grouped-query attention)."""
    removed_roots = {grp.roots[i] for grp in p.groups for i in grp.remove}
    done: dict[str, set[str]] = {}
    for split in sorted(p.splits, key=lambda s: -len(s.slots)):
        gone = sum(1 for s in split.slots if s in removed_roots)
        if gone and split.module:
            module = model.get_submodule(split.module)
            changed = resize_heads(
                module, len(split.slots), len(split.slots) - gone, split.unit, skip=done.setdefault(split.module, set())
            )
            done[split.module].update(changed)


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


def structured(
    model: nn.Module,
    example_inputs,
    ratio: float | dict = 0.5,
    importance: str | Callable = "l1",
    ignore: Sequence[str] | None = None,
    global_ranking: bool = False,
    min_channels: int = 1,
    round_to: int = 1,
    prune_heads: bool = True,
    data: Iterable | None = None,
    loss_fn: Callable | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Remove `ratio` of the channels (and attention heads) of every prunable group, physically.

    `nn.MultiheadAttention` layers are first replaced by the equivalent `Attention` so heads can go.
    The model's inputs and outputs keep their widths; layers in `ignore` (module paths) keep their
    output channels. `importance` is l1, l2, bn_scale, taylor (pass `data` and `loss_fn`) or random.
    The plan is kept on the model as `model.torchslim_prune_plan` (what went, what was kept and why);
    with `verbose` its summary is printed."""
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
    g = build(model, example_inputs, prune_heads)
    decision = lambda keep: decide(g, ratio, importance, ignore, global_ranking, min_channels, round_to, keep)  # noqa: E731
    p = _plan_that_runs(model, example_inputs, decision)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    apply(model, p)
    model.zero_grad(set_to_none=True)
    p.config = hf_config.update(model, before, head_counts(p), lambda m: main_output(m, example_inputs))
    if p.config:
        p.notes.append(p.config)
    object.__setattr__(model, "torchslim_prune_plan", p)
    if verbose:
        console.log(p.summary())
    return model


def _plan_that_runs(model: nn.Module, example_inputs, decision: Callable[[dict], Plan], tries: int = 4) -> Plan:
    """Cut a copy and run it. Code can fix a width the graph cannot show (timm's attention reshapes to
    its *input's* width): the layer type that failed keeps every channel it touches, and the plan is
    made again, until the pruned copy runs."""
    keep: dict[str, graph_mod.Reason] = {}
    for _ in range(tries):
        p = decision(keep)
        trial = apply(copy.deepcopy(model), p)
        try:
            _call(trial, example_inputs)
            return p
        except Exception as exc:
            failed = _failing_layers(model, trial, exc)
            if not failed or set(failed) <= set(keep):
                raise TorchslimError(
                    f"the pruned {type(model).__name__} no longer runs ({_first_line(exc)}). A "
                    "layer's code probably uses a fixed width or head count; put that layer in "
                    "`ignore`."
                ) from None
            keep.update(failed)
    raise TorchslimError(
        f"the pruned {type(model).__name__} still fails after keeping {', '.join(keep)} whole; "
        "put the failing layers in `ignore`."
    )


def _failing_layers(model: nn.Module, trial: nn.Module, exc: Exception) -> dict[str, graph_mod.Reason]:
    """Every layer of the type whose code raised, with the reason."""
    names = {id(m): n for n, m in trial.named_modules() if n}
    where = None
    for frame, lineno in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get(frame.f_code.co_varnames[0]) if frame.f_code.co_argcount else None
        if isinstance(owner, nn.Module) and id(owner) in names:
            where = (names[id(owner)], type(owner), f"{frame.f_code.co_filename.rpartition('/')[2]}:{lineno}")
    if where is None:
        return {}
    path, cls, line = where
    why = (
        f"the pruned model failed in this {cls.__name__} ({_first_line(exc)}): its code fixes a width the "
        f"graph does not show, so every {cls.__name__} keeps its channels"
    )
    return {n: graph_mod.Reason(why, n, "run check", line) for n, m in model.named_modules() if n and type(m) is cls}


def _first_line(exc: Exception) -> str:
    return f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"


def head_counts(p: Plan) -> dict[int, set[int]]:
    """Heads before -> the head counts they became, over every split of the plan."""
    removed_roots = {grp.roots[i] for grp in p.groups for i in grp.remove}
    counts: dict[int, set[int]] = {}
    for split in p.splits:
        counts.setdefault(len(split.slots), set()).add(len(split.slots) - sum(s in removed_roots for s in split.slots))
    return counts


def _call(model: nn.Module, example_inputs):
    args, kwargs = (
        ((), example_inputs)
        if isinstance(example_inputs, dict)
        else ((tuple(example_inputs), {}) if isinstance(example_inputs, (list, tuple)) else ((example_inputs,), {}))
    )
    with torch.no_grad():
        return model(*args, **kwargs)


def main_output(model: nn.Module, example_inputs) -> torch.Tensor:
    """The first tensor the model returns (logits or last hidden state for Hugging Face outputs)."""
    out = _call(model, example_inputs)
    while not isinstance(out, torch.Tensor):
        out = next(v for v in (out.values() if isinstance(out, dict) else out) if v is not None)
    return out
