"""Rewrites of a fused BERT-family ONNX graph (ONNX Runtime's transformer optimizer output) for CPU
serving. In float none changes the result beyond rounding; each removes work ONNX Runtime's CPU
kernels would otherwise do (`bench/encoder_rewrites.py` measures each step; all-MiniLM-L6-v2 in
dynamic int8 on 32 fortune sentences, 31% of the padded positions real tokens: 76 -> 29 ms here).

- `split_skip_layernorm`: SkipLayerNormalization -> Add (+ bias Add) + LayerNormalization; the
  contrib kernel ran over 3x slower than the two standard ops on [32, 59, 384].
- `soften_attention_mask`: the fused Attention adds `mask_filter_value` (default -10000) to the
  scores of padded keys; its softmax then turns them into denormal floats, which the following
  probabilities x values product handles at a fraction of normal speed. At -60 a padded key's
  weight stays below e^-40 of the largest real key's unless its raw score is 20 above it, and a
  normal float (all-MiniLM-L6-v2's embeddings came out bit-for-bit the same).
- `remove_padding`: everything outside attention (the linear layers, GELU, residual adds, layer
  norms) runs on the real tokens only: after the embeddings the [batch * sequence, hidden] rows whose
  attention mask is 1 are gathered ([tokens, hidden]); each Attention node gets them scattered back
  into the padded [batch, sequence, hidden] layout and its output is gathered again; the last hidden
  state is scattered back before pooling. Padded positions of the final hidden state are zeros (the
  pooling ignores them through the mask)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from torchslim.io import replacing

MASK_FILTER_VALUE = -60.0
NORMS = ("LayerNormalization", "SkipLayerNormalization")


def split_skip_layernorm(model: onnx.ModelProto) -> int:
    """Replace every SkipLayerNormalization by Add [+ Add bias] + LayerNormalization; returns how many."""
    out, count = [], 0
    for node in model.graph.node:
        if node.op_type != "SkipLayerNormalization":
            out.append(node)
            continue
        count += 1
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-12)
        total = node.output[3] if len(node.output) > 3 and node.output[3] else f"{node.name}_sum"
        bias = node.input[4] if len(node.input) > 4 and node.input[4] else None
        first = f"{node.name}_skip" if bias else total
        out.append(helper.make_node("Add", list(node.input[:2]), [first], name=f"{node.name}_add"))
        if bias:
            out.append(helper.make_node("Add", [first, bias], [total], name=f"{node.name}_add_bias"))
        out.append(
            helper.make_node(
                "LayerNormalization",
                [total, node.input[2], node.input[3]],
                [node.output[0]],
                name=f"{node.name}_norm",
                axis=-1,
                epsilon=eps,
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(out)
    return count


def soften_attention_mask(model: onnx.ModelProto, value: float = MASK_FILTER_VALUE) -> int:
    """Set `mask_filter_value` on every fused Attention node; returns how many."""
    nodes = [n for n in model.graph.node if n.op_type == "Attention"]
    for node in nodes:
        kept = [a for a in node.attribute if a.name != "mask_filter_value"]
        del node.attribute[:]
        node.attribute.extend([*kept, helper.make_attribute("mask_filter_value", float(value))])
    return len(nodes)


def _index_nodes(mask: str, embeddings: str, hidden: int) -> tuple[list, list]:
    """Nodes computing the real tokens' row indices, a zero [batch * sequence, hidden] buffer, the
    padded shape and the gathered embeddings (`pad_free_embeddings`); plus their constants."""
    consts = [
        numpy_helper.from_array(np.array(v, dtype=np.int64), name)
        for name, v in (("pf_flat", [-1]), ("pf_hidden", [hidden]), ("pf_axis1", [1]))
    ]
    nodes = [
        helper.make_node("Reshape", [mask, "pf_flat"], ["pf_mask"], name="pf_mask"),
        helper.make_node("NonZero", ["pf_mask"], ["pf_nonzero"], name="pf_nonzero"),
        helper.make_node("Reshape", ["pf_nonzero", "pf_flat"], ["pf_index"], name="pf_index"),
        helper.make_node("Unsqueeze", ["pf_index", "pf_axis1"], ["pf_index_2d"], name="pf_index_2d"),
        helper.make_node("Shape", ["pf_mask"], ["pf_positions"], name="pf_positions"),
        helper.make_node("Concat", ["pf_positions", "pf_hidden"], ["pf_zeros_shape"], name="pf_zeros_shape", axis=0),
        helper.make_node(
            "ConstantOfShape",
            ["pf_zeros_shape"],
            ["pf_zeros"],
            name="pf_zeros",
            value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]),
        ),
        helper.make_node("Shape", [embeddings], ["pf_padded_shape"], name="pf_padded_shape"),
        *_gather(embeddings, "pad_free_embeddings", "pf_embeddings"),
    ]
    return nodes, consts


def _gather(padded: str, packed: str, tag: str) -> list:
    # Flatten, not a reshape to the hidden width: with pruned heads Attention's output is narrower
    return [
        helper.make_node("Flatten", [padded], [f"{tag}_rows"], name=f"{tag}_rows", axis=2),
        helper.make_node("Gather", [f"{tag}_rows", "pf_index"], [packed], name=f"{tag}_gather", axis=0),
    ]


def _scatter(packed: str, padded: str, tag: str) -> list:
    return [
        helper.make_node("ScatterND", ["pf_zeros", "pf_index_2d", packed], [f"{tag}_rows"], name=f"{tag}_scatter"),
        helper.make_node("Reshape", [f"{tag}_rows", "pf_padded_shape"], [padded], name=f"{tag}_padded"),
    ]


def remove_padding(model: onnx.ModelProto, mask_input: str = "attention_mask") -> int:
    """Run everything but attention on the real tokens only (see the module docstring). Needs the
    fused graph's EmbedLayerNormalization and Attention nodes; returns the number of Attention nodes
    wrapped, 0 (graph unchanged) when the graph has no EmbedLayerNormalization or Attention, or still
    has an unfused attention (a Softmax), which needs the padded layout."""
    graph = model.graph
    ops = {n.op_type for n in graph.node}
    embed = next((n for n in graph.node if n.op_type == "EmbedLayerNormalization"), None)
    norms = [n for n in graph.node if n.op_type in NORMS]
    if embed is None or not norms or "Attention" not in ops or "Softmax" in ops:
        return 0
    hidden = next(i for i in graph.initializer if i.name == embed.input[2]).dims[1]
    embeddings, last = embed.output[0], norms[-1].output[0]
    if any(o.name == last for o in graph.output):
        return 0  # the graph returns the hidden states themselves: they keep their padded layout
    head, consts = _index_nodes(mask_input, embeddings, hidden)
    graph.initializer.extend(consts)
    out, wrapped = [], 0
    for node in graph.node:
        if node is not embed:
            _rename_inputs(node, embeddings, "pad_free_embeddings")
        if node.op_type == "Attention":
            tag, result = f"pf_{node.name}", node.output[0]
            out += _scatter(node.input[0], f"{tag}_in", f"{tag}_in")
            node.input[0], node.output[0] = f"{tag}_in", f"{tag}_out"
            out += [node, *_gather(f"{tag}_out", result, f"{tag}_out")]
            wrapped += 1
            continue
        if node is not norms[-1]:
            _rename_inputs(node, last, "pf_last_hidden")
        out.append(node)
        if node is embed:
            out += head
        if node is norms[-1]:
            out += _scatter(last, "pf_last_hidden", "pf_last")
    del graph.node[:]
    graph.node.extend(out)
    return wrapped


def _rename_inputs(node: onnx.NodeProto, old: str, new: str) -> None:
    for i, name in enumerate(node.input):
        if name == old:
            node.input[i] = new


def serving_rewrites(src: Path, dst: Path, pad_free: bool = True) -> Path:
    """All three rewrites (the padding removal only with `pad_free`) of the fused graph at `src`,
    saved to `dst` (which may be `src`: written to a temporary file, then renamed)."""
    model = onnx.load(str(src))
    split_skip_layernorm(model)
    soften_attention_mask(model)
    if pad_free:
        remove_padding(model)
    onnx.checker.check_model(model)
    with replacing(dst) as tmp:
        onnx.save(model, str(tmp))
    return Path(dst)
