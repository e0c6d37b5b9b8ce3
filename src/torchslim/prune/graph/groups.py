"""Which channels are coupled: capture the model's ATen graph and follow every channel through it.

Each activation's channel dimension carries a list of *slot* ids, one per position. Ops that create
channels (a linear or convolution weight's output rows, an embedding's columns) make new slots; every
parameter or buffer an op binds to channels records a *use* (which tensor, which of its dimensions,
the slots at each position). Residual additions and broadcasting products unify slots, concatenation
joins the lists, flattening repeats a slot over the merged positions, and a reshape that splits a
channel dimension into (heads, head size) unifies each head's positions, so heads go whole. Anything
no rule understands *blocks* the slots it touches, remembering the module, op and source line, so the
plan can say why a group was kept. How each op family couples channels lives in `rules.py`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import fx, nn


@dataclass
class Info:
    """Channel tracking of an activation: its channel dimension and the slot at each position."""

    dim: int
    slots: list[int]


@dataclass
class Stack:
    """Channel sets stacked along `dim`: a fused q/k/v projection reshaped to (..., 3, heads, head
    size). Item i (an Info in the whole tensor's dimensions) is what index i of `dim` holds; picking
    one (`unbind`, `select`) gives it back as an ordinary activation."""

    dim: int
    items: list[Info]


@dataclass
class PInfo:
    """A parameter or buffer (state-dict key), seen through view-like ops: for each dimension of the
    current tensor, the parameter's dimension it is (None for a dimension the ops added)."""

    key: str
    dims: tuple


@dataclass
class Use:
    """Positions along `dim` of the state tensor `key` follow `slots`; `role` says how (out: the op
    makes these channels; in, norm, param: it reads them; grouped_in: a grouped conv's columns)."""

    key: str
    dim: int
    slots: list[int]
    role: str
    groups: int = 1

    @property
    def module(self) -> str:
        return self.key.rpartition(".")[0]


@dataclass
class Reason:
    """Why some channels are kept: the op that stopped the analysis and where it is in the code."""

    why: str
    module: str
    op: str
    line: str
    slots: list[int] = field(default_factory=list)

    def text(self) -> str:
        where = f" ({self.line})" if self.line else ""
        return f"{self.module or '<model>'}: {self.op}: {self.why}{where}"


@dataclass
class HeadSplit:
    """A reshape that split channels into (heads, head size) inside `module`; `slots` holds one slot per
    head (the plan holds them resolved to their roots) and `unit` the positions of one head."""

    module: str
    slots: list[int]
    unit: int


@dataclass
class Graph:
    model: nn.Module
    uses: list[Use] = field(default_factory=list)
    constraints: list = field(default_factory=list)  # (slots, blocks): same count removed from every block
    parent: list[int] = field(default_factory=list)
    reasons: list[Reason] = field(default_factory=list)
    frozen: dict[str, Reason] = field(default_factory=dict)  # tensors used in ways no rule follows
    splits: list[HeadSplit] = field(default_factory=list)
    prune_heads: bool = True
    here: tuple[str, str, str] = ("", "", "")  # (module, op, line) of the node being read

    def new(self, n: int) -> list[int]:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return list(range(start, start + n))

    def find(self, s: int) -> int:
        while self.parent[s] != s:
            self.parent[s] = self.parent[self.parent[s]]
            s = self.parent[s]
        return s

    def union(self, a: list[int], b: list[int]) -> None:
        for x, y in zip(a, b, strict=True):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def reason(self, why: str) -> Reason:
        module, op, line = self.here
        return Reason(why, module, op, line)

    def block(self, values, why: str) -> None:
        """Keep every channel in `values` (Info, PInfo or nested lists of them), saying why."""
        r = self.reason(why)
        for v in leaves(values):
            if isinstance(v, Info):
                r.slots.extend(v.slots)
            elif isinstance(v, PInfo):
                self.frozen.setdefault(v.key, r)
        self.reasons.append(r)

    def bind(self, p: PInfo, current_dim: int, slots: list[int], role: str, groups: int = 1) -> bool:
        """Record that dimension `current_dim` of the tensor `p` follows `slots`; False (and the tensor
        frozen) when that dimension is not one of the parameter's own or has another size."""
        dim = p.dims[current_dim] if -len(p.dims) <= current_dim < len(p.dims) else None
        if dim is None or self.size(p.key, dim) != len(slots) // groups:
            self.frozen.setdefault(p.key, self.reason(f"{p.key} is used along a dimension that is not its own"))
            return False
        self.uses.append(Use(p.key, dim, slots, role, groups))
        return True

    def size(self, key: str, dim: int) -> int:
        return self.tensors[key].shape[dim]

    @property
    def tensors(self) -> dict[str, torch.Tensor]:
        if not hasattr(self, "_tensors"):
            self._tensors = {
                **dict(self.model.named_parameters(remove_duplicate=False)),
                **dict(self.model.named_buffers(remove_duplicate=False)),
            }
        return self._tensors

    def finish(self) -> None:
        """Tie every use of one tensor dimension together (shared and tied weights) and keep the
        channels of tensors used in ways no rule follows."""
        first: dict[tuple[str, int], list[int]] = {}
        for u in self.uses:
            if u.role == "grouped_in":
                continue
            seen = first.setdefault((u.key, u.dim), u.slots)
            if seen is not u.slots and len(seen) == len(u.slots):
                self.union(seen, u.slots)
        for key, r in self.frozen.items():
            for u in self.uses:
                if u.key == key:
                    r.slots.extend(u.slots)
            if r not in self.reasons:
                self.reasons.append(r)

    def blocked_roots(self) -> set[int]:
        return {self.find(s) for r in self.reasons for s in r.slots}


def leaves(values):
    if isinstance(values, Stack):
        yield from values.items
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from leaves(v)
    elif isinstance(values, dict):
        for v in values.values():
            yield from leaves(v)
    elif values is not None:
        yield values


def shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def where(node) -> tuple[str, str, str]:
    """(module path, op, source line) of a graph node, for saying why channels were kept."""
    stack = node.meta.get("nn_module_stack") or {}
    module = list(stack.values())[-1][0] if stack else ""
    op = (
        node.target.name().split("::")[-1]
        if hasattr(node.target, "name")
        else getattr(node.target, "__name__", str(node.target))
    )
    trace = (node.meta.get("stack_trace") or "").strip().splitlines()
    frames = [(m.group(1), m.group(2)) for line in trace if (m := _FRAME.search(line))]
    line = ""
    if frames:
        path, number = frames[-1]
        code = trace[-1].strip() if not trace[-1].lstrip().startswith("File") else ""
        line = f"{path.rpartition('/')[2]}:{number}" + (f" `{code[:80]}`" if code else "")
    return module, op, line
