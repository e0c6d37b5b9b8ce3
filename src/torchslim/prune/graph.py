"""Which channels are coupled: trace the model with torch.fx and follow every channel through it.

Each tensor's channel dimension carries a list of *slot* ids, one per position. Layers that create
channels (conv, linear, embedding, attention output) make new slots; layers that read them record a
*use* (which module, which role, the slots at each position). Residual additions unify slots,
concatenation joins the lists, flatten repeats each slot over the spatial positions, and anything the
analysis does not understand *blocks* the slots it touches, so they are never pruned. A pruning
decision is then one set of unified slots removed from every use at once."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from torchslim.errors import TorchslimError
from torchslim.prune.attention import Attention

CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
BATCH_NORM = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
PASS_MODULES = (nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
                nn.LeakyReLU, nn.ELU, nn.Mish, nn.Softmax, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Identity,
                nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
                nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool2d)
PASS_FUNCTIONS = {torch.relu, torch.sigmoid, torch.tanh, nn.functional.relu, nn.functional.gelu,
                  nn.functional.silu, nn.functional.dropout, nn.functional.softmax, nn.functional.hardswish,
                  nn.functional.adaptive_avg_pool2d, nn.functional.max_pool2d, nn.functional.avg_pool2d,
                  nn.functional.leaky_relu, nn.functional.relu6, torch.nn.functional.layer_norm}
PASS_METHODS = {"relu", "sigmoid", "tanh", "contiguous", "clone", "float", "to", "type_as", "softmax", "detach"}
BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul,
          torch.div, operator.iadd, operator.imul}
BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}


@dataclass
class Info:
    """Channel tracking for one tensor: its channel dimension and the slot at each position."""
    dim: int
    slots: list[int]


@dataclass
class Use:
    module: str
    role: str  # out, in, norm, dw, emb, q_in, k_in, v_in, attn_out
    slots: list[int]


@dataclass
class Constraint:
    """Positions fall into `blocks` equal blocks; the same number must go from every block."""
    slots: list[int]
    blocks: int


@dataclass
class Graph:
    model: nn.Module
    uses: list[Use] = field(default_factory=list)
    constraints: list[Constraint] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)
    blocked: set[int] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)
    attention: list[str] = field(default_factory=list)  # Attention modules whose heads may be pruned

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

    def block(self, info, why: str | None = None) -> None:
        for item in (info if isinstance(info, (list, tuple)) else [info]):
            if isinstance(item, Info):
                self.blocked.update(item.slots)
        if why and why not in self.notes:
            self.notes.append(why)

    def blocked_roots(self) -> set[int]:
        return {self.find(s) for s in self.blocked}


class _Tracer(fx.Tracer):
    def __init__(self, leaves: tuple[type, ...]):
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, example: torch.Tensor, leaves: tuple[type, ...] = ()) -> fx.GraphModule:
    tracer = _Tracer((Attention, *leaves))
    try:
        graph = tracer.trace(model)
    except Exception as exc:  # fx raises many types; the first line names the construct
        raise TorchslimError(
            f"torch.fx cannot trace {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:300]}. Make the offending module a leaf "
            "(`leaf_modules=[TheClass]`, its channels are then kept) or put it in `ignore`.") from None
    gm = fx.GraphModule(model, graph)
    ShapeProp(gm).propagate(example)
    return gm


def _shape(node) -> tuple | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def build(model: nn.Module, example: torch.Tensor, leaves: tuple[type, ...] = ()) -> Graph:
    gm = trace(model, example, leaves)
    g = Graph(model)
    env: dict[fx.Node, object] = {}
    modules = dict(gm.named_modules())
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            shape = _shape(node)
            if shape:
                dim = 1 if len(shape) >= 4 else len(shape) - 1
                env[node] = Info(dim, g.new(shape[dim]))
                g.block(env[node])  # the model's input channels are fixed
        elif node.op == "output":
            g.block(_flatten_infos(node.args[0], env))  # so are its outputs
        elif node.op == "call_module":
            env[node] = _module_rule(g, node, modules[node.target], env)
        elif node.op in ("call_function", "call_method"):
            env[node] = _function_rule(g, node, env)
    return g


def _flatten_infos(arg, env) -> list:
    if isinstance(arg, fx.Node):
        value = env.get(arg)
        return value if isinstance(value, list) else [value]
    if isinstance(arg, (list, tuple)):
        return [i for a in arg for i in _flatten_infos(a, env)]
    if isinstance(arg, dict):
        return [i for a in arg.values() for i in _flatten_infos(a, env)]
    return []


def _arg_info(node, i: int, env, key: str | None = None):
    arg = node.args[i] if len(node.args) > i else node.kwargs.get(key) if key else None
    return env.get(arg) if isinstance(arg, fx.Node) else None


def _module_rule(g: Graph, node, module: nn.Module, env):
    name, x = node.target, _arg_info(node, 0, env, "input")
    shape = _shape(node)
    if isinstance(module, CONV):
        return _conv_rule(g, name, module, x, shape)
    if isinstance(module, nn.Linear):
        if isinstance(x, Info) and x.dim == len(_shape(node.args[0])) - 1:
            g.uses.append(Use(name, "in", x.slots))
        else:
            g.block(x, f"{name}: input features not traceable, kept")
        out = Info(len(shape) - 1, g.new(module.out_features))
        g.uses.append(Use(name, "out", out.slots))
        return out
    if isinstance(module, BATCH_NORM) or (isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1):
        if isinstance(x, Info) and (x.dim == 1 if isinstance(module, BATCH_NORM) else x.dim == len(shape) - 1):
            g.uses.append(Use(name, "norm", x.slots))
            return x
        g.block(x, f"{name}: normalised dimension is not the tracked channel dimension")
        return None
    if isinstance(module, nn.GroupNorm):
        if isinstance(x, Info) and x.dim == 1:
            g.uses.append(Use(name, "norm", x.slots))
            if 1 < module.num_groups < module.num_channels:
                g.constraints.append(Constraint(x.slots, module.num_groups))
            return x
        g.block(x, f"{name}: GroupNorm input not traceable")
        return None
    if isinstance(module, nn.Embedding):
        out = Info(len(shape) - 1, g.new(module.embedding_dim))
        g.uses.append(Use(name, "emb", out.slots))
        return out
    if isinstance(module, Attention):
        return _attention_rule(g, node, name, module, env, shape)
    if isinstance(module, nn.Flatten):
        return _reshape_rule(g, x, _shape(node.args[0]), shape, name)
    if isinstance(module, PASS_MODULES):
        return x if isinstance(x, Info) and shape and len(shape) > x.dim and shape[x.dim] == len(x.slots) else \
            _blocked(g, x, f"{name} ({type(module).__name__}) changes the channel layout")
    g.block(_flatten_infos(list(node.args), env),
            f"{name}: {type(module).__name__} is not understood by the dependency analysis; its channels are kept")
    return None


def _blocked(g: Graph, x, why: str):
    g.block(x, why)
    return None


def _conv_rule(g: Graph, name: str, conv, x, shape):
    if not (isinstance(x, Info) and x.dim == 1):
        g.block(x, f"{name}: input channels not traceable, kept")
        out = Info(1, g.new(conv.out_channels))
        g.uses.append(Use(name, "out", out.slots))
        g.block(out)
        return out
    if conv.groups == 1:
        g.uses.append(Use(name, "in", x.slots))
        out = Info(1, g.new(conv.out_channels))
        g.uses.append(Use(name, "out", out.slots))
        return out
    if conv.groups == conv.in_channels == conv.out_channels:  # depthwise: channel c in, channel c out
        g.uses.append(Use(name, "dw", x.slots))
        return Info(1, list(x.slots))
    g.uses.append(Use(name, "in", x.slots))  # grouped: the same number of channels from every group
    g.constraints.append(Constraint(x.slots, conv.groups))
    out = Info(1, g.new(conv.out_channels))
    g.uses.append(Use(name, "out", out.slots))
    g.constraints.append(Constraint(out.slots, conv.groups))
    return out


def _attention_rule(g: Graph, node, name: str, module: Attention, env, shape):
    for i, (role, key) in enumerate((("q_in", "query"), ("k_in", "key"), ("v_in", "value"))):
        info = _arg_info(node, i, env, key)
        if isinstance(info, Info) and info.dim == len(_shape(node.args[i] if len(node.args) > i
                                                              else node.kwargs[key])) - 1:
            g.uses.append(Use(name, role, info.slots))
        else:
            g.block(info, f"{name}: {key} input not traceable")
    g.attention.append(name)
    out_shape = node.meta["tensor_meta"][0].shape
    out = Info(len(out_shape) - 1, g.new(module.out_proj.out_features))
    g.uses.append(Use(name, "attn_out", out.slots))
    return [out, None]


def _reshape_rule(g: Graph, x, in_shape, out_shape, where: str):
    """Flatten-like reshapes: the channel dim survives, or it and all later dims merge into one."""
    if not isinstance(x, Info) or in_shape is None or out_shape is None:
        return _blocked(g, x, f"{where}: reshape of an untracked tensor")
    d = x.dim
    if tuple(in_shape[:d + 1]) == tuple(out_shape[:d + 1]):
        return Info(d, x.slots)
    rest = 1
    for s in in_shape[d + 1:]:
        rest *= s
    if tuple(in_shape[:d]) == tuple(out_shape[:d]) and len(out_shape) == d + 1 and out_shape[d] == len(x.slots) * rest:
        return Info(d, [s for s in x.slots for _ in range(rest)])
    return _blocked(g, x, f"{where}: reshape {list(in_shape)} -> {list(out_shape)} mixes channels; kept")


def _function_rule(g: Graph, node, env):
    target, shape = node.target, _shape(node)
    args = list(node.args)
    x = env.get(args[0]) if args and isinstance(args[0], fx.Node) else None
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if node.op == "call_method" and target in ("size", "dim", "numel"):
        return None
    if target is getattr or (node.op == "call_function" and target is operator.getitem
                             and isinstance(x, list)):
        return x[args[1]] if isinstance(x, list) else None
    if target in BINARY or (node.op == "call_method" and target in BINARY_METHODS):
        return _binary_rule(g, node, env, shape, name)
    if target in (torch.cat, torch.concat):
        return _cat_rule(g, node, env, shape)
    if target in (torch.flatten,) or (node.op == "call_method" and target in ("flatten", "view", "reshape")):
        return _reshape_rule(g, x, _shape(args[0]), shape, f"{name} at {node.name}")
    if node.op == "call_method" and target in ("transpose", "permute") and isinstance(x, Info) and shape:
        rank = len(shape)
        if target == "transpose":
            a, b = (int(v) % rank for v in args[1:3])
            dims = list(range(rank))
            dims[a], dims[b] = dims[b], dims[a]
        else:
            raw = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            dims = [int(v) % rank for v in raw]
        return Info(dims.index(x.dim), x.slots)
    if (target in PASS_FUNCTIONS or (node.op == "call_method" and target in PASS_METHODS)) and isinstance(x, Info):
        if shape and len(shape) > x.dim and shape[x.dim] == len(x.slots):
            return x
    if node.op == "call_method" and target in ("mean", "sum", "amax") and isinstance(x, Info) and shape:
        reduced = args[1] if len(args) > 1 else node.kwargs.get("dim")
        reduced = [reduced] if isinstance(reduced, int) else list(reduced or [])
        in_rank = len(_shape(args[0]))
        reduced = [r % in_rank for r in reduced]
        keep = node.kwargs.get("keepdim", False) or (len(args) > 2 and args[2])
        if reduced and x.dim not in reduced:
            return Info(x.dim if keep else x.dim - sum(r < x.dim for r in reduced), x.slots)
    infos = _flatten_infos(args, env) + _flatten_infos(dict(node.kwargs), env)
    if any(isinstance(i, Info) for i in infos):
        g.block(infos, f"{name} at {node.name} is not understood by the dependency analysis; its channels are kept")
    return None


def _binary_rule(g: Graph, node, env, shape, name):
    tensors = [a for a in node.args if isinstance(a, fx.Node)]
    infos = [env.get(a) for a in tensors]
    if not tensors:
        return None
    tracked = [i for i in infos if isinstance(i, Info)]
    if len(tracked) == len(tensors) and all(len(i.slots) == len(tracked[0].slots) and i.dim == tracked[0].dim
                                            for i in tracked):
        for other in tracked[1:]:
            g.union(tracked[0].slots, other.slots)  # a residual connection couples both sides
        return tracked[0]
    if len(tracked) == 1 and shape and all(_broadcasts_over_channels(_shape(a), tracked[0]) for a in tensors
                                           if env.get(a) is None):
        return tracked[0]
    g.block(infos, f"{name} at {node.name} combines tensors whose channels cannot be matched; kept")
    return None


def _broadcasts_over_channels(shape, info: Info) -> bool:
    """True for scalars and tensors of size 1 along the channel dimension."""
    if shape is None:
        return True
    offset = len(shape) - 1 - info.dim if info.dim >= 0 else 0
    return len(shape) == 0 or all(s == 1 for s in shape) or (0 <= offset < len(shape) and shape[-1 - offset] == 1)


def _cat_rule(g: Graph, node, env, shape):
    tensors = node.args[0]
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    infos = [env.get(t) for t in tensors]
    if not all(isinstance(i, Info) for i in infos) or shape is None:
        g.block(infos, f"cat at {node.name}: an input is untracked; kept")
        return None
    dim = dim % len(shape)
    if all(i.dim == dim for i in infos):
        return Info(dim, [s for i in infos for s in i.slots])
    if all(i.dim == infos[0].dim for i in infos):
        for other in infos[1:]:
            g.union(infos[0].slots, other.slots)
        return infos[0]
    g.block(infos, f"cat at {node.name} joins tensors with different channel dimensions; kept")
    return None
