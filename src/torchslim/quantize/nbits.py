"""Lower weights quantized in PyTorch (`quantize.weights`: round-to-nearest, GPTQ) to ONNX Runtime's
`MatMulNBits`, with *our* integers, scales and zero points, so the kernel computes exactly the
dequantized weights the PyTorch model was measured with (re-quantizing them with ONNX Runtime's own
quantizer would pick other scales and undo GPTQ's choices).

A MatMul whose constant right-hand side equals the transposed weight of a quantized layer becomes
MatMulNBits(x, B, scales[, zero_points]) with attributes K, N, bits, block_size; B holds, per output
column n and block, the unsigned integers packed low bits first. Symmetric grids store q + 2^(bits-1)
and leave zero points out (the kernel's default); asymmetric grids store q and their zero points."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper
from torch import nn

from torchslim.errors import TorchslimError
from torchslim.io import replacing
from torchslim.log import warn
from torchslim.quantize.lower import atomic_output, gemm_to_matmul


def _key(array: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(array, dtype=np.float32).tobytes()).hexdigest()


def _pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned integers (..., k) into bytes, low bits first: (..., k * bits / 8)."""
    values = values.astype(np.uint8)
    if bits == 8:
        return values
    per = 8 // bits
    shaped = values.reshape(*values.shape[:-1], -1, per)
    out = np.zeros(shaped.shape[:-1], dtype=np.uint8)
    for i in range(per):
        out |= (shaped[..., i] & ((1 << bits) - 1)) << (i * bits)
    return out


def matmul_nbits_inputs(q, scale, zero, grid) -> dict[str, np.ndarray]:
    """B (N, blocks, bytes per block), scales (N * blocks,) and, asymmetric, zero points, from a
    (N x K) integer weight and its (N x blocks) scales and zero points."""
    if grid.bits not in (4, 8):
        raise TorchslimError(f"ONNX Runtime's MatMulNBits runs 4- and 8-bit weights; got {grid.bits} bits.")
    q, scale, zero = (t.detach().cpu().numpy() for t in (q, scale, zero))
    n, k = q.shape
    blocks, g = scale.shape[1], grid.width(k)
    offset = 0 if not grid.symmetric else 2 ** (grid.bits - 1)
    unsigned = np.zeros((n, blocks * g), np.int16)  # a short last group is padded; the kernel reads K columns
    unsigned[:, :k] = q.astype(np.int16) + offset
    unsigned = unsigned.reshape(n, blocks, g)
    out = {"B": _pack(unsigned, grid.bits), "scales": scale.astype(np.float32).reshape(-1)}
    if not grid.symmetric:
        z = zero.astype(np.uint8)
        if grid.bits == 4 and blocks % 2:
            z = np.concatenate([z, np.zeros((n, 1), np.uint8)], 1)
        out["zero_points"] = _pack(z, grid.bits).reshape(-1)
    return out


def gather_block_inputs(q, scale, zero, grid) -> dict[str, np.ndarray]:
    """GatherBlockQuantized's data (V, H * bits / 8, unsigned, low bits first), scales (V, blocks) and,
    asymmetric, zero points, from an embedding table quantized along its rows' width (the same
    integers as the tied output head's)."""
    q, scale, zero = (t.detach().cpu().numpy() for t in (q, scale, zero))
    offset = 0 if not grid.symmetric else 2 ** (grid.bits - 1)
    unsigned = q.astype(np.int16) + offset
    if grid.bits == 4 and unsigned.shape[1] % 2:
        unsigned = np.concatenate([unsigned, np.zeros((len(unsigned), 1), np.int16)], 1)
    out = {"data": _pack(unsigned, grid.bits), "scales": scale.astype(np.float32)}
    if not grid.symmetric:
        z = zero.astype(np.uint8)
        if grid.bits == 4 and z.shape[1] % 2:
            z = np.concatenate([z, np.zeros((len(z), 1), np.uint8)], 1)
        out["zero_points"] = _pack(z, grid.bits)
    return out


def _add(graph, arrays: dict[str, np.ndarray], prefix: str) -> list[str]:
    names = []
    for part, array in arrays.items():
        names.append(f"{prefix}_nbits_{part}")
        graph.initializer.append(numpy_helper.from_array(array, names[-1]))
    return names


def found_init_name(node, inits: dict, transposed: dict) -> str:
    return node.input[1] if node.input[1] in inits else transposed[node.input[1]]


def _reshaped(graph, nodes: list, source: str, shape: tuple) -> str:
    """The name of `source` reshaped to `shape` by a new Reshape node (one copy of the bytes on disk)."""
    target = numpy_helper.from_array(np.array(shape, np.int64), f"{source}_shape")
    graph.initializer.append(target)
    nodes.append(
        helper.make_node("Reshape", [source, target.name], [f"{source}_as{len(shape)}d"], name=f"{source}_reshape")
    )
    return nodes[-1].output[0]


def _live(nodes: list, outputs: set[str]) -> list:
    """`nodes` without those whose results nothing uses any more (the Transpose of a tied table whose
    MatMul and Gather were both replaced)."""
    while True:
        used = outputs | {i for n in nodes for i in n.input}
        kept = [n for n in nodes if any(o in used for o in n.output)]
        if len(kept) == len(nodes):
            return kept
        nodes = kept


@atomic_output
def lower_quantized_weights(src: Path, dst: Path, model: nn.Module, fuse: bool = True) -> Path:
    """Every MatMul of `src` whose weight (an initializer, or the Transpose of one: a head tied to the
    embeddings) is a layer of `model` quantized by `quantize.weights` becomes MatMulNBits with that
    layer's integers and scales; a Gather from that same table (the tied input embeddings) becomes
    GatherBlockQuantized with them. `fuse`: then the MatMulNBits reading the same input on the same
    grid are merged (`fuse_parallel`: a block's q/k/v, its gate/up; the same outputs, bit for bit).
    Returns `dst`."""
    layers = {}
    for name, layer in model.named_modules():
        record = getattr(layer, "torchslim_weight_grid", None)
        if record is not None:
            layers[_key(layer.weight.detach().float().cpu().numpy())] = (name, record)
    graph_model = gemm_to_matmul(onnx.load(str(src)))
    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}
    transposed = {
        n.output[0]: n.input[0]
        for n in graph.node
        if n.op_type == "Transpose" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    }

    def weight_of(node):
        """(the quantized layer whose weight a MatMul or Gather node reads, K, N) or None."""
        if node.op_type == "MatMul" and len(node.input) == 2:
            if node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
                init = inits[node.input[1]]
                return layers.get(_key(numpy_helper.to_array(init).T)), *init.dims
            if node.input[1] in transposed:
                init = inits[transposed[node.input[1]]]
                return layers.get(_key(numpy_helper.to_array(init))), *reversed(init.dims)
        return None

    nbits: dict[str, tuple[list[str], dict]] = {}  # layer -> MatMulNBits initializer names, arrays (added once)

    def matmul_inputs(name: str, record, prefix: str):
        if name not in nbits:
            arrays = matmul_nbits_inputs(*record[1:], record[0])
            nbits[name] = _add(graph, arrays, prefix), arrays
        return nbits[name]

    matches = {i: match for i, node in enumerate(graph.node) if (match := weight_of(node)) and match[0] is not None}
    as_matmul = {match[0][0] for match in matches.values()}
    done, nodes = set(), []
    for index, node in enumerate(graph.node):
        found = None
        if index in matches:
            found, k, n = matches[index]
            name, (grid, q, scale, zero) = found
            inputs, _ = matmul_inputs(name, (grid, q, scale, zero), found_init_name(node, inits, transposed))
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [node.input[0], *inputs],
                    list(node.output),
                    name=f"{node.name or name}_nbits",
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=grid.bits,
                    block_size=grid.width(k),
                )
            )
        elif node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2:
            init = inits[node.input[0]]
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            found = layers.get(_key(numpy_helper.to_array(init))) if attrs.get("axis", 0) == 0 else None
            if found is not None:
                name, (grid, q, scale, zero) = found
                arrays = gather_block_inputs(q, scale, zero, grid)
                shared = None
                if name in as_matmul:  # the tied head's bytes, reshaped, when they are the same integers
                    names, theirs = matmul_inputs(name, (grid, q, scale, zero), init.name)
                    pairs = list(zip(arrays.values(), theirs.values(), names))
                    if len(arrays) == len(theirs) and all(
                        a.size == b.size and np.array_equal(a.reshape(-1), b.reshape(-1)) for a, b, _ in pairs
                    ):
                        shared = [_reshaped(graph, nodes, source, a.shape) for a, _, source in pairs]
                data, *rest = shared or _add(graph, arrays, init.name + "_gather")
                nodes.append(
                    helper.make_node(
                        "GatherBlockQuantized",
                        [data, node.input[1], *rest],
                        list(node.output),
                        name=f"{node.name or name}_nbits",
                        domain="com.microsoft",
                        gather_axis=0,
                        quantize_axis=1,
                        block_size=grid.width(init.dims[1]),
                        bits=grid.bits,
                    )
                )
        if found is None:
            nodes.append(node)
        else:
            done.add(found[0])
    if not done:
        raise TorchslimError(
            "no MatMul of the exported graph carries a quantized layer's weight; quantize the "
            "model with torchslim.quantize.weights before exporting it."
        )
    del graph.node[:]
    graph.node.extend(_live(nodes, {o.name for o in graph.output}))
    if fuse:
        fuse_parallel(graph_model)
    _drop_unused(graph)
    if not any(o.domain == "com.microsoft" for o in graph_model.opset_import):
        graph_model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    onnx.save(graph_model, str(dst))
    missing = sorted(set(n for n, _ in layers.values()) - done)
    if missing:
        warn(
            f"weight-only lowering: {len(missing)} quantized layer(s) found no MatMul in the graph and stay float "
            f"there ({', '.join(missing[:5])})"
        )
    return dst


def set_accuracy_level(src: Path, dst: Path, level: int) -> Path:
    """`src` with every MatMulNBits' accuracy_level set to `level` (0: float compute, 4: int8), to `dst`."""
    graph_model = onnx.load(str(src))
    for node in graph_model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept + [helper.make_attribute("accuracy_level", level)])
    with replacing(dst) as tmp:
        onnx.save(graph_model, str(tmp))
    return Path(dst)


def fuse_parallel(graph_model: onnx.ModelProto) -> int:
    """MatMulNBits nodes that read the same input with the same K, bits, block size, accuracy level and
    zero-point layout (a block's query, key and value projections; its gate and up projections) become
    one node over their output columns side by side, then a Split back into the original outputs: one
    pass over the activations and one kernel launch instead of several, the same arithmetic per column.
    In place; returns how many nodes were merged away."""
    graph = graph_model.graph
    inits = {i.name: i for i in graph.initializer}

    def signature(node):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "MatMulNBits" or len(node.input) > 4 or any(i not in inits for i in node.input[1:]):
            return None  # g_idx or bias inputs, or weights computed in the graph: left alone
        return (
            node.input[0],
            attrs["K"],
            attrs["bits"],
            attrs["block_size"],
            attrs.get("accuracy_level", 0),
            len(node.input),
        )

    groups: dict[tuple, list] = {}
    for node in graph.node:
        key = signature(node)
        if key is not None:
            groups.setdefault(key, []).append(node)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return 0
    first = {id(group[0]): group for group in groups.values()}
    merged = {id(n) for group in groups.values() for n in group[1:]}
    nodes = []
    for node in graph.node:
        if id(node) in merged:
            continue
        group = first.get(id(node))
        if group is None:
            nodes.append(node)
            continue
        widths = [helper.get_attribute_value(next(a for a in n.attribute if a.name == "N")) for n in group]
        name = f"{group[0].name}_fused{len(group)}"
        inputs = [group[0].input[0]]
        for slot in range(1, len(group[0].input)):
            array = np.concatenate([numpy_helper.to_array(inits[n.input[slot]]) for n in group], axis=0)
            graph.initializer.append(numpy_helper.from_array(array, f"{name}_{slot}"))
            inputs.append(f"{name}_{slot}")
        attrs = {a.name: helper.get_attribute_value(a) for a in group[0].attribute}
        attrs["N"] = sum(widths)
        nodes.append(
            helper.make_node("MatMulNBits", inputs, [f"{name}_out"], name=name, domain="com.microsoft", **attrs)
        )
        split = numpy_helper.from_array(np.array(widths, np.int64), f"{name}_split")
        graph.initializer.append(split)
        nodes.append(
            helper.make_node(
                "Split", [f"{name}_out", split.name], [n.output[0] for n in group], name=f"{name}_split", axis=-1
            )
        )
    del graph.node[:]
    graph.node.extend(nodes)
    _drop_unused(graph)
    return len(merged)


def _drop_unused(graph) -> None:
    """Remove the initializers no node reads any more, in place."""
    used = {i for node in graph.node for i in node.input}
    kept = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
