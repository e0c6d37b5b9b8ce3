"""How each ATen op family moves, couples, creates or stops channels: one small rule per family,
registered by op name (`@rule("linear")`). A rule reads its inputs' channel tracking (Info for an
activation, PInfo for a parameter or buffer, None for anything else) and returns its output's. An op
without a rule keeps every channel it touches, with the reason recorded, so coverage grows by adding
rules here, never by special cases elsewhere. Users can register rules for their own ops too."""

from __future__ import annotations

import math
import operator
from typing import Callable

from torch import fx

from torchslim.prune.graph.groups import Graph, HeadSplit, Info, PInfo, Stack, leaves, shape

RULES: dict[str, Callable] = {}


def rule(*names: str):
    """Register `fn(g, node, args, kwargs)` as the rule for the ATen ops `names` (in-place variants
    such as `relu_` share the rule of `relu`)."""

    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn

    return register


def op_name(node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    name = (
        node.target.name().split("::")[-1].split(".")[0]
        if hasattr(node.target, "name")
        else getattr(node.target, "__name__", str(node.target))
    )
    return name[:-1] if name.endswith("_") and not name.endswith("__") else name


def _value(arg, env):
    if isinstance(arg, fx.Node):
        return env.get(arg)
    if isinstance(arg, (list, tuple)):
        return [_value(a, env) for a in arg]
    return arg


def read_node(g: Graph, node, env):
    name = op_name(node)
    args = [_value(a, env) for a in node.args]
    kwargs = {k: _value(v, env) for k, v in node.kwargs.items()}
    fn = RULES.get(name)
    stacks = list(_stacks((args, kwargs)))
    if stacks and name not in STACK_AWARE:
        g.block(stacks, f"`{name}` on the stacked parts of a fused projection")
        return None
    if fn is not None:
        return fn(g, node, args, kwargs)
    tracked = [v for v in leaves((args, kwargs)) if isinstance(v, (Info, PInfo))]
    if not tracked:
        return None
    why = f"`{name}` is not understood by the dependency analysis"
    g.block(tracked, why)
    first, out = args[0] if args else None, shape(node)
    if isinstance(first, Info) and out is not None and out == _in_shape(node):
        return _fresh(g, first.dim, len(first.slots), why)  # kept, but later ops can still place it
    return None


STACK_AWARE = {
    "permute",
    "permute_copy",
    "transpose",
    "swapaxes",
    "swapdims",
    "movedim",
    "select",
    "unbind",
    "getitem",
    "clone",
    "contiguous",
    "detach",
    "alias",
    "_assert_tensor_metadata",
}


def _stacks(values):
    if isinstance(values, Stack):
        yield values
    elif isinstance(values, (list, tuple)):
        for v in values:
            yield from _stacks(v)
    elif isinstance(values, dict):
        yield from _stacks(list(values.values()))


def _arg(node, args, kwargs, i: int, key: str, default=None):
    return args[i] if len(args) > i else kwargs.get(key, default)


def _in_shape(node, i: int = 0):
    return shape(node.args[i]) if len(node.args) > i else None


# ----------------------------------------------------------------------------- no channels at all


@rule(
    "_assert_tensor_metadata",
    "_assert_scalar",
    "sym_size",
    "sym_numel",
    "arange",
    "zeros",
    "ones",
    "full",
    "empty",
    "scalar_tensor",
    "new_ones",
    "new_zeros",
    "new_full",
    "new_empty",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "__and__",
    "__or__",
    "logical_and",
    "logical_or",
    "logical_not",
    "bitwise_and",
    "bitwise_or",
    "bitwise_not",
    "isnan",
    "isinf",
    "isfinite",
    "argmax",
    "argmin",
    "_local_scalar_dense",
    "item",
    "lift_fresh_copy",
    "_assert_async",
    "triu",
    "tril",
    "ones_like_",
    "randint",
    "rand",
    "randn",
)
def _nothing(g, node, args, kwargs):
    return None


@rule("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like")
def _like(g, node, args, kwargs):
    """A fresh tensor shaped like its input follows the input's channels."""
    return args[0] if isinstance(args[0], Info) else None


# ----------------------------------------------------------------------------- element-wise

UNARY = (
    "relu",
    "gelu",
    "silu",
    "sigmoid",
    "tanh",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "relu6",
    "leaky_relu",
    "elu",
    "celu",
    "selu",
    "mish",
    "softplus",
    "logsigmoid",
    "dropout",
    "feature_dropout",
    "alpha_dropout",
    "clone",
    "contiguous",
    "to",
    "_to_copy",
    "detach",
    "alias",
    "neg",
    "abs",
    "exp",
    "log",
    "sqrt",
    "rsqrt",
    "erf",
    "square",
    "sin",
    "cos",
    "reciprocal",
    "clamp",
    "clamp_min",
    "clamp_max",
    "softmax",
    "_softmax",
    "log_softmax",
    "_log_softmax",
    "sign",
    "round",
    "floor",
    "ceil",
    "trunc",
    "nan_to_num",
    "expm1",
    "log1p",
    "type_as",
    "pow",
    "float",
    "half",
    "bfloat16",
    "cumsum",
    "_safe_softmax",
)


@rule(*UNARY)
def _unary(g, node, args, kwargs):
    """Same shape out as in: channels pass. Other tensor operands (pow by a tensor) combine as in a
    binary op; `type_as` only reads its second operand's dtype."""
    if op_name(node) != "type_as" and any(isinstance(a, fx.Node) for a in node.args[1:]):
        return _binary(g, node, args, kwargs)
    x = args[0]
    if isinstance(x, (Info, PInfo, Stack)) and shape(node) == _in_shape(node):
        return x
    if isinstance(x, (Info, PInfo)):
        g.block(x, "changes the shape of its input")
    return None


@rule("native_dropout")
def _native_dropout(g, node, args, kwargs):
    return [args[0], args[0]] if isinstance(args[0], Info) else [None, None]


@rule(
    "add",
    "sub",
    "mul",
    "div",
    "rsub",
    "maximum",
    "minimum",
    "fmod",
    "remainder",
    "atan2",
    "where",
    "masked_fill",
    "addcmul",
    "addcdiv",
    "lerp",
    "copy",
    "fill",
    "max_other",
    "min_other",
)
def _binary(g, node, args, kwargs):
    """Broadcasting ops: the tracked operands' channel dimensions meet in the output and are unified
    (a residual connection couples both sides); a parameter broadcast along the channel dimension
    (a scale, a bias, a position embedding) follows the channels; a size-1 operand is harmless."""
    out = shape(node)
    operands = [(args[i], shape(a)) for i, a in enumerate(node.args) if isinstance(a, fx.Node) and shape(a)]
    operands += [(kwargs[k], shape(a)) for k, a in node.kwargs.items() if isinstance(a, fx.Node) and shape(a)]
    if out is None:
        g.block([v for v, _ in operands], "its output is not a tensor")
        return None
    rank = len(out)
    infos = [(v, s) for v, s in operands if isinstance(v, Info)]
    if not infos:
        return _param_arithmetic(g, operands, rank)
    dims = {v.dim + rank - len(s) for v, s in infos}
    width = len(infos[0][0].slots)
    if len(dims) > 1 or any(len(v.slots) != width for v, _ in infos) or out[next(iter(dims))] != width:
        g.block([v for v, _ in operands], "combines tensors whose channels are on different dimensions")
        return None
    d = dims.pop()
    for v, _ in infos[1:]:
        g.union(infos[0][0].slots, v.slots)
    for v, s in operands:
        cur = d - (rank - len(s))
        along = 0 <= cur < len(s) and s[cur] == width and width > 1
        if isinstance(v, PInfo) and along:
            g.bind(v, cur, infos[0][0].slots, "param")
        elif v is None and along:
            g.block([i for i, _ in infos], "combines the channels with a tensor the analysis cannot follow")
            return None
    return Info(d, infos[0][0].slots)


def _param_arithmetic(g, operands, rank):
    """`1 + weight`: a parameter with constants is still that parameter; parameters combined with
    other tensors are weights computed at run time, kept."""
    params = [(v, s) for v, s in operands if isinstance(v, PInfo)]
    others = [s for v, s in operands if not isinstance(v, PInfo) and math.prod(s) > 1]
    if len(params) == 1 and not others:
        p, s = params[0]
        return PInfo(p.key, (None,) * (rank - len(s)) + tuple(p.dims))
    if params:
        g.block([p for p, _ in params], "a weight computed from other tensors at run time")
    return None


# ----------------------------------------------------------------------------- reductions

REDUCE = {
    "mean": (1, 2),
    "sum": (1, 2),
    "amax": (1, 2),
    "amin": (1, 2),
    "max": (1, 2),
    "min": (1, 2),
    "var": (1, None),
    "std": (1, None),
    "logsumexp": (1, 2),
    "linalg_vector_norm": (2, 3),
    "norm": (2, 3),
    "prod": (1, 2),
    "any": (1, 2),
    "all": (1, 2),
    "var_mean": (1, None),
    "std_mean": (1, None),
}


@rule(*REDUCE)
def _reduce(g, node, args, kwargs):
    """Reducing other dimensions moves the channel dimension; reducing over the channels (a norm's
    statistics) mixes them, which removing channels changes but never breaks."""
    name = op_name(node)
    if name in ("max", "min") and len(node.args) > 1 and isinstance(node.args[1], fx.Node):
        return _binary(g, node, args, kwargs)
    x, s = args[0], _in_shape(node)
    if isinstance(x, PInfo):
        g.block(x, "a weight reduced at run time")
        return None
    if not isinstance(x, Info) or s is None:
        return None
    dim_at, keep_at = REDUCE[name]
    dims = _arg(node, args, kwargs, dim_at, "dim")
    keep = bool(
        _arg(node, args, kwargs, keep_at, "keepdim", False) if keep_at is not None else kwargs.get("keepdim", False)
    )
    dims = list(range(len(s))) if dims is None else [dims] if isinstance(dims, int) else list(dims)
    dims = [d % len(s) for d in dims]
    result = None if x.dim in dims else Info(x.dim if keep else x.dim - sum(d < x.dim for d in dims), x.slots)
    return [result, result] if isinstance(node.meta.get("val"), (list, tuple)) else result


# ----------------------------------------------------------------------------- shapes


def _prefix(sizes, n: int) -> int:
    return math.prod(sizes[:n])


def _find_dim(ins, out, d: int) -> int | None:
    """The output dimension that starts where input dimension `d` starts (skipping size-1 dims)."""
    target, j, acc = _prefix(ins, d), 0, 1
    while j < len(out) and acc < target:
        acc *= out[j]
        j += 1
    if acc != target:
        return None
    while j < len(out) - 1 and out[j] == 1 and ins[d] != 1:
        j += 1
    return j if j < len(out) else None


def reshape_info(g: Graph, x: Info, ins, out):
    """A reshape keeps the channel dimension, splits it into (heads, head size) — each head's positions
    unified so heads go whole — or merges it with the dimensions after it (a flatten: each channel
    repeats over the merged positions)."""
    width = len(x.slots)
    j = _find_dim(ins, out, x.dim)
    if j is None:
        return _stop(g, x, f"reshape {list(ins)} -> {list(out)} mixes the channels with other dimensions")
    if out[j] == width:
        return Info(j, x.slots)
    if out[j] < width and width % out[j] == 0 and _prefix(out, j + 1) * (width // out[j]) <= math.prod(out):
        unit = width // out[j]
        k, acc = j + 1, 1
        while k < len(out) and acc < unit:
            acc *= out[k]
            k += 1
        if acc == unit and k == j + 2:
            return _split_heads(g, x, out[j], unit, j)
        if acc == unit and k == j + 3:  # (parts, heads, head size): a fused q/k/v projection
            return _stack_heads(g, x, out[j], out[j + 1], out[j + 2], j)
    rest, k = 1, x.dim + 1
    while k < len(ins) and width * rest < out[j]:
        rest *= ins[k]
        k += 1
    if width * rest == out[j]:
        return Info(j, [s for s in x.slots for _ in range(rest)])
    return _stop(g, x, f"reshape {list(ins)} -> {list(out)} mixes the channels with other dimensions")


def _split_heads(g: Graph, x: Info, heads: int, unit: int, dim: int):
    if not g.prune_heads:
        return _stop(g, x, "splits channels into heads, and prune_heads is off")
    groups = [x.slots[h * unit : (h + 1) * unit] for h in range(heads)]
    for members in groups:
        g.union(members[:1] * (unit - 1), members[1:])
    reps = [m[0] for m in groups]
    g.splits.append(HeadSplit(g.here[0], reps, unit))
    return Info(dim, reps)


def _stack_heads(g: Graph, x: Info, parts: int, heads: int, unit: int, dim: int):
    width = heads * unit
    return Stack(
        dim,
        [
            _split_heads(g, Info(dim + 1, x.slots[i * width : (i + 1) * width]), heads, unit, dim + 1)
            for i in range(parts)
        ],
    )


def _stop(g, x, why: str):
    g.block(x, why)
    return None


def _reshape_param(g: Graph, p: PInfo, ins, out):
    dims = [None] * len(out)
    for i, d in enumerate(p.dims):
        if d is None or ins[i] == 1:
            continue
        j = _find_dim(ins, out, i)
        if j is None or out[j] != ins[i]:
            return _stop(g, p, "a weight reshaped at run time")
        dims[j] = d
    return PInfo(p.key, tuple(dims))


@rule(
    "view",
    "reshape",
    "_unsafe_view",
    "view_copy",
    "flatten",
    "unflatten",
    "squeeze",
    "unsqueeze",
    "_reshape_alias",
    "view_as",
    "reshape_as",
)
def _reshape(g, node, args, kwargs):
    x, ins, out = args[0], _in_shape(node), shape(node)
    if ins is None or out is None:
        return _stop(g, x, "reshape of a tensor without a known shape") if isinstance(x, (Info, PInfo)) else None
    if isinstance(x, PInfo):
        return _reshape_param(g, x, ins, out)
    return reshape_info(g, x, ins, out) if isinstance(x, Info) else None


@rule("expand", "expand_copy", "broadcast_to")
def _expand(g, node, args, kwargs):
    x, ins, out = args[0], _in_shape(node), shape(node)
    extra = len(out) - len(ins)
    if isinstance(x, Info):
        return Info(x.dim + extra, x.slots)
    if isinstance(x, PInfo):
        return PInfo(
            x.key,
            (None,) * extra + tuple(None if ins[i] == 1 and out[i + extra] != 1 else d for i, d in enumerate(x.dims)),
        )
    return None


def _permuted(x, perm):
    if isinstance(x, Stack):
        return Stack(perm.index(x.dim), [_permuted(i, perm) for i in x.items])
    if isinstance(x, Info):
        return Info(perm.index(x.dim), x.slots)
    if isinstance(x, PInfo):
        return PInfo(x.key, tuple(x.dims[i] for i in perm))
    return None


@rule("permute", "permute_copy")
def _permute(g, node, args, kwargs):
    rank = len(_in_shape(node))
    return _permuted(args[0], [int(d) % rank for d in args[1]])


@rule("transpose", "swapaxes", "swapdims", "t", "numpy_T", "movedim")
def _transpose(g, node, args, kwargs):
    rank = len(_in_shape(node))
    perm = list(range(rank))
    if op_name(node) in ("t", "numpy_T"):
        perm = perm[::-1]
    elif op_name(node) == "movedim":
        src, dst = int(args[1]) % rank, int(args[2]) % rank
        perm.remove(src)
        perm.insert(dst, src)
    else:
        a, b = int(args[1]) % rank, int(args[2]) % rank
        perm[a], perm[b] = perm[b], perm[a]
    return _permuted(args[0], perm)


@rule("slice", "narrow")
def _slice(g, node, args, kwargs):
    x, ins = args[0], _in_shape(node)
    dim = int(_arg(node, args, kwargs, 1, "dim", 0)) % len(ins)
    whole = shape(node)[dim] == ins[dim]
    if isinstance(x, Info):
        return x if dim != x.dim or whole else _stop(g, x, "slices the channel dimension")
    if isinstance(x, PInfo):
        return x if whole else PInfo(x.key, tuple(None if i == dim else d for i, d in enumerate(x.dims)))
    return None


@rule("select")
def _select(g, node, args, kwargs):
    x, ins = args[0], _in_shape(node)
    dim = int(args[1]) % len(ins)
    if isinstance(x, Stack):
        return _unstacked(g, x, dim, [int(args[2]) % ins[dim]])[0]
    if isinstance(x, Info):
        return Info(x.dim - (dim < x.dim), x.slots) if dim != x.dim else _stop(g, x, "selects one channel")
    if isinstance(x, PInfo):
        return PInfo(x.key, tuple(d for i, d in enumerate(x.dims) if i != dim))
    return None


@rule("index")
def _index(g, node, args, kwargs):
    """Advanced indexing on dimensions other than the channels' (`x[:, idx]`, a cls token, a gather of
    positions); indexing the channels themselves is kept."""
    x, ins, out = args[0], _in_shape(node), shape(node)
    if not isinstance(x, Info):
        return _stop(g, x, "a weight indexed at run time") if isinstance(x, PInfo) else None
    indexed = [i for i, ix in enumerate(args[1]) if ix is not None or node.args[1][i] is not None]
    if x.dim in indexed or not indexed:
        return _stop(g, x, "indexes the channel dimension")
    if x.dim < min(indexed):
        return x
    if x.dim > max(indexed) and indexed == list(range(indexed[0], indexed[-1] + 1)):
        d = x.dim + len(out) - len(ins)
        if out[d] == len(x.slots):
            return Info(d, x.slots)
    return _stop(g, x, "indexes dimensions around the channels")


def _split_sizes(node, args):
    name, ins = op_name(node), _in_shape(node)
    dim = int(args[2] if len(args) > 2 else node.kwargs.get("dim", 0)) % len(ins)
    pieces = node.meta.get("val")
    sizes = [p.shape[dim] for p in pieces] if isinstance(pieces, (list, tuple)) else []
    return name, dim, sizes


@rule("split", "split_with_sizes", "chunk", "tensor_split", "unsafe_split")
def _split(g, node, args, kwargs):
    """Split along another dimension: every piece keeps the channels. Along the channels into equal
    pieces (`x.chunk(2, dim=1)`): each piece gets its share, and the same number goes from each."""
    x = args[0]
    _, dim, sizes = _split_sizes(node, args)
    if not isinstance(x, Info) or not sizes:
        return (
            [_stop(g, x, "a weight split at run time")] * len(sizes)
            if isinstance(x, PInfo)
            else [None] * max(len(sizes), 1)
        )
    if dim != x.dim:
        return [x] * len(sizes)
    if len(set(sizes)) != 1:
        return [_stop(g, x, "splits the channels into unequal pieces")] * len(sizes)
    g.constraints.append((x.slots, len(sizes)))
    n = sizes[0]
    return [Info(dim, x.slots[i * n : (i + 1) * n]) for i in range(len(sizes))]


@rule("unbind")
def _unbind(g, node, args, kwargs):
    x, ins = args[0], _in_shape(node)
    dim = int(_arg(node, args, kwargs, 1, "dim", 0)) % len(ins)
    if isinstance(x, Stack):
        return _unstacked(g, x, dim, range(ins[dim]))
    if isinstance(x, Info) and dim != x.dim:
        return [Info(x.dim - (dim < x.dim), x.slots)] * ins[dim]
    if isinstance(x, (Info, PInfo)):
        g.block(x, "unbinds the channel dimension")
    return [None] * ins[dim]


def _unstacked(g: Graph, x: Stack, dim: int, picks) -> list:
    """Picking parts out of a stack along its stacking dimension gives the parts themselves."""
    if dim != x.dim:
        return [_stop(g, x, "indexes a fused projection's stacked parts along another dimension")] * len(picks)
    return [Info(x.items[i].dim - (dim < x.items[i].dim), x.items[i].slots) for i in picks]


@rule("getitem")
def _getitem(g, node, args, kwargs):
    return args[0][args[1]] if isinstance(args[0], (list, tuple)) else None


@rule("cat", "concat", "concatenate")
def _cat(g, node, args, kwargs):
    """Along the channels the lists join (a U-Net skip, DenseNet); along another dimension (a cls
    token before the patches) the inputs' channels are one."""
    tensors, out = args[0], shape(node)
    rank = len(out)
    dim = int(_arg(node, args, kwargs, 1, "dim", 0)) % rank
    shapes = [shape(t) for t in node.args[0]]
    infos = [v for v in tensors if isinstance(v, Info)]
    if any(v is None for v in tensors) and infos:
        return _stop(g, tensors, "concatenates channels with a tensor the analysis cannot follow")
    if infos and all(isinstance(v, Info) and v.dim == dim for v in tensors):
        return Info(dim, [s for v in tensors for s in v.slots])
    if not infos:
        return _stop(g, tensors, "concatenates weights at run time") if tensors else None
    d, width = infos[0].dim, len(infos[0].slots)
    if any(v.dim != d or len(v.slots) != width for v in infos) or d == dim:
        return _stop(g, tensors, "concatenates tensors whose channels are on different dimensions")
    for v in infos[1:]:
        g.union(infos[0].slots, v.slots)
    for v, s in zip(tensors, shapes):
        if isinstance(v, PInfo) and not g.bind(v, d - (rank - len(s)), infos[0].slots, "param"):
            return _stop(g, infos, "concatenates a weight along the channels")
    return Info(d, infos[0].slots)


@rule("stack")
def _stack(g, node, args, kwargs):
    tensors, out = args[0], shape(node)
    dim = int(_arg(node, args, kwargs, 1, "dim", 0)) % len(out)
    infos = [v for v in tensors if isinstance(v, Info)]
    if not infos:
        return _stop(g, tensors, "stacks weights at run time") if any(isinstance(v, PInfo) for v in tensors) else None
    if len(infos) != len(tensors) or any(v.dim != infos[0].dim or len(v.slots) != len(infos[0].slots) for v in infos):
        return _stop(g, tensors, "stacks tensors whose channels cannot be matched")
    for v in infos[1:]:
        g.union(infos[0].slots, v.slots)
    return Info(infos[0].dim + (dim <= infos[0].dim), infos[0].slots)


@rule("repeat")
def _repeat(g, node, args, kwargs):
    x, ins, out = args[0], _in_shape(node), shape(node)
    if isinstance(x, Info):
        d = x.dim + len(out) - len(ins)
        return Info(d, x.slots) if out[d] == len(x.slots) else _stop(g, x, "repeats the channels")
    return _stop(g, x, "a weight repeated at run time") if isinstance(x, PInfo) else None


# ----------------------------------------------------------------------------- spatial ops

SPATIAL = (
    "max_pool1d",
    "max_pool2d",
    "max_pool3d",
    "avg_pool1d",
    "avg_pool2d",
    "avg_pool3d",
    "adaptive_avg_pool1d",
    "adaptive_avg_pool2d",
    "adaptive_avg_pool3d",
    "_adaptive_avg_pool2d",
    "_adaptive_avg_pool3d",
    "adaptive_max_pool1d",
    "adaptive_max_pool2d",
    "upsample_nearest1d",
    "upsample_nearest2d",
    "upsample_nearest3d",
    "upsample_bilinear2d",
    "upsample_bicubic2d",
    "upsample_linear1d",
    "upsample_trilinear3d",
    "_upsample_nearest_exact2d",
    "_upsample_bilinear2d_aa",
    "reflection_pad1d",
    "reflection_pad2d",
    "replication_pad1d",
    "replication_pad2d",
    "constant_pad_nd",
    "pad",
    "roll",
    "flip",
    "max_pool2d_with_indices",
    "max_pool1d_with_indices",
    "max_pool3d_with_indices",
    "lp_pool2d",
    "fractional_max_pool2d",
    "im2col",
)


@rule(*SPATIAL)
def _spatial(g, node, args, kwargs):
    """Pooling, resampling and padding act on the positions, not the channels."""
    x, out = args[0], node.meta.get("val")
    first = out[0] if isinstance(out, (list, tuple)) else out
    if (
        isinstance(x, Info)
        and first is not None
        and tuple(first.shape)[x.dim] == len(x.slots)
        and x.dim < len(first.shape) - _spatial_rank(node)
    ):
        return [x, x] if isinstance(out, (list, tuple)) else x
    if isinstance(x, (Info, PInfo)):
        g.block(x, "acts on the channel dimension")
    return [None, None] if isinstance(out, (list, tuple)) else None


def _spatial_rank(node) -> int:
    name = op_name(node)
    if name in ("constant_pad_nd", "pad"):
        return len(node.args[1]) // 2
    if name in ("roll", "flip"):
        return 0
    return 1 if "1d" in name else 3 if "3d" in name else 2


# ----------------------------------------------------------------------------- layers


def _fresh(g: Graph, rank_or_dim: int, n: int, why: str | None = None) -> Info:
    info = Info(rank_or_dim, g.new(n))
    if why:
        g.block(info, why)
    return info


def _bind_all(g, params, dim: int, slots, role: str) -> None:
    for p in params:
        if isinstance(p, PInfo):
            g.bind(p, dim, slots, role)


@rule("linear")
def _linear(g, node, args, kwargs):
    x, w, b = args[0], args[1], _arg(node, args, kwargs, 2, "bias")
    ins, out = _in_shape(node), shape(node)
    if not isinstance(w, PInfo):
        g.block([x, w], "a linear layer whose weight is computed at run time")
        return _fresh(g, len(out) - 1, out[-1], "a linear layer whose weight is computed at run time")
    new = g.new(out[-1])
    g.bind(w, 0, new, "out")
    _bind_all(g, [b], 0, new, "out")
    if isinstance(x, Info) and x.dim == len(ins) - 1:
        g.bind(w, 1, x.slots, "in")
    elif isinstance(x, Info):  # mixes another dimension (an MLP-Mixer token mix): channels pass
        g.block(Info(len(out) - 1, new), "a linear layer over a dimension other than the channels")
        return x
    return Info(len(out) - 1, new)


@rule("addmm")
def _addmm(g, node, args, kwargs):
    """bias + x @ W with W stored (in, out): Hugging Face's Conv1D (GPT-2)."""
    b, x, w = args[0], args[1], args[2]
    out = shape(node)
    if not isinstance(w, PInfo):
        g.block([x, w, b], "a matrix product with a weight computed at run time")
        return None
    new = g.new(out[-1])
    g.bind(w, 1, new, "out")
    _bind_all(g, [b], -1, new, "out")
    if isinstance(x, Info) and x.dim == 1:
        g.bind(w, 0, x.slots, "in")
    elif isinstance(x, Info):
        g.block(x, "a matrix product over a dimension other than the channels")
    return Info(1, new)


@rule("matmul", "mm", "bmm")
def _matmul(g, node, args, kwargs):
    a, b = args[0], args[1]
    sa, sb, out = _in_shape(node, 0), _in_shape(node, 1), shape(node)
    if isinstance(b, PInfo) and len(sb) == 2 and not isinstance(a, PInfo):
        new = g.new(sb[1])
        g.bind(b, 1, new, "out")
        if isinstance(a, Info) and a.dim == len(sa) - 1:
            g.bind(b, 0, a.slots, "in")
        elif isinstance(a, Info):
            g.block(a, "a matrix product over a dimension other than the channels")
        return Info(len(out) - 1, new)
    if isinstance(a, PInfo) or isinstance(b, PInfo) or len(sa) < 2 or len(sb) < 2:
        return _stop(g, [a, b], "a matrix product the analysis does not follow")
    return _matmul_activations(g, a, b, sa, sb, out)


def _matmul_activations(g, a, b, sa, sb, out):
    """(…, n, k) @ (…, k, m): the k positions of both sides pair up; batch dimensions (attention heads)
    broadcast like a binary op; n and m pass to the output."""
    ra, rb, r = len(sa), len(sb), len(out)
    results, contracted = [], []
    for v, rank, inner, outer in ((a, ra, ra - 1, r - 2), (b, rb, rb - 2, r - 1)):
        if not isinstance(v, Info):
            continue
        if v.dim == inner:
            contracted.append(v)
        else:
            results.append((outer if v.dim == (rank - 2 if v is a else rank - 1) else v.dim + r - rank, v))
    if contracted:
        if len(contracted) == 2 and len(contracted[0].slots) == len(contracted[1].slots):
            g.union(contracted[0].slots, contracted[1].slots)
        else:
            g.block(contracted, "a matrix product over channels that only one side tracks")
    if not results:
        return None
    d, first = results[0]
    for d2, other in results[1:]:
        if d2 == d and len(other.slots) == len(first.slots):
            g.union(first.slots, other.slots)
        else:
            g.block(other, "a matrix product of tensors whose channels cannot be matched")
    return Info(d, first.slots)


@rule("conv1d", "conv2d", "conv3d")
def _conv(g, node, args, kwargs):
    groups = int(_arg(node, args, kwargs, 6, "groups", 1))
    return _convolution(g, node, args[0], args[1], _arg(node, args, kwargs, 2, "bias"), groups, False)


@rule("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def _conv_transpose(g, node, args, kwargs):
    groups = int(_arg(node, args, kwargs, 6, "groups", 1))
    return _convolution(g, node, args[0], args[1], _arg(node, args, kwargs, 2, "bias"), groups, True)


@rule("convolution", "_convolution")
def _convolution_op(g, node, args, kwargs):
    return _convolution(g, node, args[0], args[1], args[2], int(args[8]), bool(args[6]))


def _convolution(g, node, x, w, b, groups: int, transposed: bool):
    out = shape(node)
    cin, cout = _in_shape(node)[1], out[1]
    if not isinstance(w, PInfo):
        g.block(x, "a convolution whose weight is computed at run time")
        return _fresh(g, 1, cout, "a convolution whose weight is computed at run time")
    if isinstance(x, Info) and x.dim != 1:
        g.block(x, "a convolution over a dimension other than the channels")
        x = None
    if groups == 1:
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        if isinstance(x, Info):
            g.bind(w, in_dim, x.slots, "in")
        new = g.new(cout)
        g.bind(w, out_dim, new, "out")
        _bind_all(g, [b], 0, new, "out")
        return Info(1, new)
    if groups == cin == cout and not transposed:  # depthwise: channel c in, channel c out
        if not isinstance(x, Info):
            return _fresh(g, 1, cout, "a depthwise convolution of an untracked input")
        g.bind(w, 0, x.slots, "dw")
        _bind_all(g, [b], 0, x.slots, "dw")
        return Info(1, x.slots)
    if transposed:
        g.block(x, "a grouped transposed convolution")
        return _fresh(g, 1, cout, "a grouped transposed convolution")
    if isinstance(x, Info):  # grouped: the same number of channels from every group
        g.bind(w, 1, x.slots, "grouped_in", groups)
        g.constraints.append((x.slots, groups))
    new = g.new(cout)
    g.bind(w, 0, new, "out")
    _bind_all(g, [b], 0, new, "out")
    g.constraints.append((new, groups))
    return Info(1, new)


@rule(
    "batch_norm",
    "_native_batch_norm_legit_no_training",
    "_native_batch_norm_legit",
    "native_batch_norm",
    "_native_batch_norm_legit_functional",
    "instance_norm",
)
def _batch_norm(g, node, args, kwargs):
    x, params = args[0], [a for a in args[1:5] if isinstance(a, PInfo)]
    multi = isinstance(node.meta.get("val"), (list, tuple))
    if isinstance(x, Info) and x.dim == 1:
        _bind_all(g, params, 0, x.slots, "norm")
        return [x, None, None] + [None] * (len(node.meta["val"]) - 3) if multi else x
    g.block([x, *params], "normalises a dimension other than the channels")
    return [None] * len(node.meta["val"]) if multi else None


@rule("layer_norm", "native_layer_norm", "rms_norm", "_fused_rms_norm")
def _layer_norm(g, node, args, kwargs):
    x, normalized = args[0], list(args[1])
    params = [a for a in args[2:4] if isinstance(a, PInfo)]
    multi = isinstance(node.meta.get("val"), (list, tuple))
    rank = len(_in_shape(node))
    wrap = (lambda v: [v] + [None] * (len(node.meta["val"]) - 1)) if multi else (lambda v: v)
    if isinstance(x, Info) and x.dim < rank - len(normalized):
        return wrap(x)
    if isinstance(x, Info) and len(normalized) == 1 and x.dim == rank - 1 and params:
        _bind_all(g, params, 0, x.slots, "norm")
        return wrap(x)
    g.block([x, *params], "normalises the channels together with other dimensions, or has no weight to cut")
    return wrap(None)


@rule("group_norm", "native_group_norm")
def _group_norm(g, node, args, kwargs):
    x = args[0]
    name = op_name(node)
    groups = int(args[1] if name == "group_norm" else args[6])
    params = [a for a in (args[2:4] if name == "group_norm" else args[1:3]) if isinstance(a, PInfo)]
    multi = name == "native_group_norm"
    if isinstance(x, Info) and x.dim == 1 and params:
        _bind_all(g, params, 0, x.slots, "norm")
        if 1 < groups < len(x.slots):
            g.constraints.append((x.slots, groups))
        return [x, None, None] if multi else x
    g.block([x, *params], "GroupNorm over an untracked input or without weights")
    return [None, None, None] if multi else None


@rule("embedding")
def _embedding(g, node, args, kwargs):
    w, out = args[0], shape(node)
    if not isinstance(w, PInfo):
        return None
    new = g.new(out[-1])
    g.bind(w, 1, new, "out")
    return Info(len(out) - 1, new)


@rule(
    "scaled_dot_product_attention",
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_attention_math",
    "_scaled_dot_product_efficient_attention",
)
def _attention(g, node, args, kwargs):
    """Heads of q, k and v go together (a key/value head with its whole query group under grouped-query
    attention); without a head split, q and k pair up position by position and v passes."""
    q, k, v = args[:3]
    rank = len(_in_shape(node))
    multi = isinstance(node.meta.get("val"), (list, tuple))
    wrap = (lambda r: [r] + [None] * (len(node.meta["val"]) - 1)) if multi else (lambda r: r)
    if (
        all(isinstance(t, Info) and t.dim == rank - 3 for t in (q, k, v))
        and len(k.slots) == len(v.slots)
        and len(q.slots) % len(k.slots) == 0
    ):
        rep = len(q.slots) // len(k.slots)
        g.union(q.slots, [s for s in k.slots for _ in range(rep)])
        g.union(q.slots, [s for s in v.slots for _ in range(rep)])
        return wrap(Info(rank - 3, q.slots))
    if all(isinstance(t, Info) and t.dim == rank - 1 for t in (q, k, v)) and len(q.slots) == len(k.slots):
        g.union(q.slots, k.slots)
        return wrap(Info(rank - 1, v.slots))
    g.block([q, k, v], "attention inputs whose heads cannot be matched")
    return wrap(None)
