"""Build the dependency graph: capture the model, then read every node through its op's rule."""

from __future__ import annotations

import torch
from torch import fx, nn

from torchslim.prune.graph.capture import capture
from torchslim.prune.graph.groups import Graph, Info, PInfo, shape, where
from torchslim.prune.graph.rules import read_node


def build(model: nn.Module, example, prune_heads: bool = True) -> Graph:
    """Capture `model` on `example` (a tensor, a tuple of arguments or a dict of keyword arguments) and
    follow its channels."""
    program = capture(model, example)
    sig = program.graph_signature
    state = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
    g = Graph(model, prune_heads=prune_heads)
    env: dict[fx.Node, object] = {}
    live = _live(program.graph)
    for node in program.graph.nodes:
        if node.op == "call_function" and node not in live:
            continue  # computed and never used (a fast-path check that reads weights): no coupling
        g.here = where(node) if node.op == "call_function" else ("", node.op, "")
        if node.op == "placeholder":
            env[node] = _placeholder(g, node, state)
        elif node.op == "output":
            g.here = ("", "output", "")
            g.block([env.get(a) for a in _nodes(node.args)], "the model's outputs keep their width")
        elif node.op == "call_function":
            env[node] = read_node(g, node, env)
    g.finish()
    return g


def _live(graph: fx.Graph) -> set:
    """Nodes the outputs depend on (in-place ops count as used: they change a tensor that is)."""
    live: set = set()
    stack = [
        n
        for n in graph.nodes
        if n.op == "output"
        or (
            n.op == "call_function"
            and hasattr(n.target, "name")
            and n.target.name().split(".")[0].endswith("_")
            and not n.target.name().split(".")[0].endswith("__")
        )
    ]
    while stack:
        node = stack.pop()
        if node not in live:
            live.add(node)
            stack.extend(node.all_input_nodes)
    return live


def _placeholder(g: Graph, node, state: dict[str, str]):
    if node.name in state:
        value = shape(node)
        return PInfo(state[node.name], tuple(range(len(value)))) if value is not None else None
    dims = shape(node)
    val = node.meta.get("val")
    if not dims or not isinstance(val, torch.Tensor) or not val.is_floating_point():
        return None  # token ids, masks and other integer inputs carry no channels
    info = Info(1 if len(dims) >= 4 else len(dims) - 1, g.new(dims[1 if len(dims) >= 4 else -1]))
    g.here = ("", "input", "")
    g.block(info, "the model's inputs keep their width")
    return info


def _nodes(args) -> list:
    out = []
    for a in args if isinstance(args, (list, tuple)) else [args]:
        if isinstance(a, fx.Node):
            out.append(a)
        elif isinstance(a, (list, tuple)):
            out += _nodes(a)
        elif isinstance(a, dict):
            out += _nodes(list(a.values()))
    return out
