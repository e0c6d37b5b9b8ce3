"""Int8 for sentence encoders, fidelity first: ONNX Runtime dynamic int8 (per-channel weights) with
accuracy-driven fallback measured as cosine similarity to the float model on calibration sentences
from every text source given (the worst source decides), so no source is tuned for alone."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

from torchslim.export.onnx import export_inputs
from torchslim.export.transformer import serving_rewrites
from torchslim.io import replacing
from torchslim.log import warn
from torchslim.measure.latency import ort_session
from torchslim.models.hf import cosine_fidelity, tokenize
from torchslim.prune.transformer.encoder import layer_shapes
from torchslim.quantize import lower
from torchslim.quantize.fallback import fallback, sensitivity

NAMES = ["input_ids", "attention_mask"]
# MatMul and the fused QKV Attention carry the compute; the word-embedding table (Gather, or inside
# the fused EmbedLayerNormalization) is most of the bytes and is looked up, not multiplied
ENCODER_OPS = ("MatMul", "Attention", "Gather", "EmbedLayerNormalization")
AXES = [{0: "batch", 1: "sequence"}] * 2


def ort_embed(session, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenize(tokenizer, sentences[i : i + batch_size])
        out.append(torch.from_numpy(session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]))
    return torch.cat(out)


def export_encoder(
    model, tokenizer, path: Path, sentences: list[str], fuse: bool = False, rewrites: bool = True, pad_free: bool = True
) -> Path:
    """ONNX with dynamic batch and sequence axes. `fuse=True` exports with the TorchScript exporter
    (whose graph ONNX Runtime's transformer optimizer recognises) and fuses attention, layer norms
    and GELU into ONNX Runtime's contrib ops (Attention, SkipLayerNormalization, ...); then, with
    `rewrites`, torchslim's CPU serving rewrites of the fused graph (`export.transformer`: layer norms
    split back out of SkipLayerNormalization, a softer attention mask and, with `pad_free`, the padded
    positions removed outside attention)."""
    ids, mask = tokenize(tokenizer, sentences[:4])
    if not fuse:
        return export_inputs(model, path, (ids, mask), NAMES, AXES)
    plain = export_inputs(
        model,
        Path(path).with_name(Path(path).stem + ".plain.onnx"),
        (ids, mask),
        NAMES,
        AXES,
        exporter="torchscript",
        opset=17,
    )
    heads = {shape["heads"] for shape in layer_shapes(model)}
    size = model.encoder.config.hidden_size // model.encoder.config.num_attention_heads
    # pruned heads: the fused Attention computes heads * head_size wide; with different head counts per
    # layer, ONNX Runtime detects each layer's from the graph (0)
    num_heads = heads.pop() if len(heads) == 1 else 0
    try:
        fuse_transformer(plain, path, num_heads, num_heads * size)
    finally:
        plain.unlink(missing_ok=True)
    return serving_rewrites(path, path, pad_free=pad_free) if rewrites else Path(path)


def fuse_transformer(src: Path, dst: Path, num_heads: int, hidden_size: int) -> Path:
    """ONNX Runtime's transformer optimizer (BERT fusions); the head count and width must be given
    (its detection from the graph misses the Attention fusion on this export)."""
    import logging

    from onnxruntime.transformers import optimizer

    logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
    with lower.quiet():
        model = optimizer.optimize_model(
            str(src), model_type="bert", num_heads=num_heads, hidden_size=hidden_size, opt_level=0
        )
    with replacing(dst, keep_suffix=True) as tmp:
        model.save_model_to_file(str(tmp))
    return Path(dst)


def fusion_counts(path: Path) -> dict[str, int]:
    ops = [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]
    return {
        op: ops.count(op)
        for op in (
            "Attention",
            "SkipLayerNormalization",
            "LayerNormalization",
            "EmbedLayerNormalization",
            "BiasGelu",
            "MatMul",
            "QAttention",
            "DynamicQuantizeMatMul",
            "MatMulInteger",
            "NonZero",
            "ScatterND",
        )
        if op in ops
    }


def _worst(path: Path, tokenizer, calibration: dict, reference: dict, threads: int) -> float:
    session = ort_session(path, threads)
    return min(
        cosine_fidelity(reference[k], ort_embed(session, tokenizer, s))["mean_cosine"] for k, s in calibration.items()
    )


def quantizable_nodes(path: Path) -> list[str]:
    """MatMul/Gemm nodes with a weight initializer, and fused Attention nodes."""
    graph = onnx.load(str(path)).graph
    weights = {i.name for i in graph.initializer}
    return [
        n.name
        for n in graph.node
        if (n.op_type == "Attention") or (n.op_type in ("MatMul", "Gemm") and any(i in weights for i in n.input[1:]))
    ]


def calibration_ranges(
    float_onnx: Path, tokenizer, calibration: dict[str, list[str]], tensors: list[str], batch_size: int = 32
) -> dict[str, tuple[float, float]]:
    """Min-max ranges of the activation `tensors` over the calibration sentences of every source."""
    feeds = [
        dict(zip(NAMES, (t.numpy() for t in tokenize(tokenizer, s[i : i + batch_size]))))
        for s in calibration.values()
        for i in range(0, len(s), batch_size)
    ]
    return lower.activation_ranges(float_onnx, feeds, tensors=tensors)


def _quantizer(float_onnx: Path, tokenizer, calibration: dict, per_channel: bool, method: str, tmp: Path):
    """(the nodes int8 may reach, quantize(dst, nodes_to_exclude)). dynamic: int8 weights, activations
    quantized at run time, for MatMul, the fused Attention and the word embeddings. static: the MatMul
    nodes in QDQ with activation ranges calibrated on the sentences; the fused Attention and the word
    embeddings (EmbedLayerNormalization), which have no static kernel in ONNX Runtime, go dynamic."""
    nodes = quantizable_nodes(float_onnx)
    if method == "dynamic":
        return nodes, lambda dst, exclude: lower.dynamic_int8(
            float_onnx, dst, per_channel, nodes_to_exclude=exclude, op_types=ENCODER_OPS
        )
    model, wanted = onnx.load(str(float_onnx)), set(nodes)
    matmuls = [n for n in model.graph.node if n.op_type != "Attention" and n.name in wanted]
    weights = {i.name for i in model.graph.initializer}
    tensors = sorted({t for n in matmuls for t in [*n.input, *n.output] if t and t not in weights})
    ranges = calibration_ranges(float_onnx, tokenizer, calibration, tensors)
    matmuls = [n.name for n in matmuls]
    # the quantizer only quantizes activations it knows to be float; ONNX shape inference leaves the
    # outputs of fused contrib ops (Attention, SkipLayerNormalization) untyped
    typed = {v.name for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    model.graph.value_info.extend(
        onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in ranges if name not in typed
    )
    path, qdq = tmp / "typed.onnx", tmp / "qdq.onnx"
    onnx.save(model, str(path))

    def quantize(dst: Path, exclude: list[str]) -> Path:
        lower.static_int8(
            path,
            qdq,
            per_channel=per_channel,
            nodes_to_quantize=matmuls,
            nodes_to_exclude=exclude,
            ranges=ranges,
            preprocessed=True,
        )
        return lower.dynamic_int8(
            qdq, dst, per_channel, nodes_to_exclude=exclude, op_types=["Attention", "EmbedLayerNormalization"]
        )

    return nodes, quantize


def fidelity_int8(
    float_onnx: Path,
    tokenizer,
    calibration: dict[str, list[str]],
    reference: dict[str, torch.Tensor],
    dst: Path,
    target: float = 0.995,
    threads: int = 2,
    per_channel: bool = True,
    method: str = "dynamic",
) -> tuple[Path, dict]:
    """Int8 (`_quantizer`: dynamic, or static) of every quantizable node of `float_onnx`; then the
    nodes whose int8 alone costs the most cosine go back to float until the worst source's mean
    calibration cosine (against the float model's embeddings `reference`) reaches `target`."""
    with tempfile.TemporaryDirectory() as tmp:
        return _fallback(
            *_quantizer(float_onnx, tokenizer, calibration, per_channel, method, Path(tmp)),
            tokenizer,
            calibration,
            reference,
            dst,
            target,
            threads,
            {"method": method, "target": target, "per_channel": per_channel},
        )


def _fallback(
    nodes: list[str],
    quantize,
    tokenizer,
    calibration: dict,
    reference: dict,
    dst: Path,
    target: float,
    threads: int,
    info: dict,
) -> tuple[Path, dict]:
    """The one fallback loop (`quantize.fallback`) scored by the worst source's calibration cosine."""

    def score(path: Path) -> float:
        return _worst(path, tokenizer, calibration, reference, threads)

    info.update(all_int8_cosine=score(quantize(dst, [])), sensitivity=[])
    if info["all_int8_cosine"] < target:
        with tempfile.TemporaryDirectory() as tmp:
            one = Path(tmp) / "one.onnx"
            costs = sensitivity(nodes, lambda name: 1 - score(quantize(one, [m for m in nodes if m != name])), "int8")
        info["sensitivity"] = sorted(({"node": n, "loss": c} for n, c in costs.items()), key=lambda r: -r["loss"])
    excluded, value = fallback(
        [r["node"] for r in info["sensitivity"]],
        lambda ex: quantize(dst, ex),
        score,
        lambda v: v >= target,
        what="int8",
        scored=info["all_int8_cosine"],
    )
    int8 = len(nodes) - len(excluded)
    info.update(
        excluded=excluded,
        cosine=value,
        int8_nodes=int8,
        nodes=len(nodes),
        target_met=value >= target,
        summary=f"{int8}/{len(nodes)} MatMul/Attention nodes quantized in the graph ({info['method']}), "
        f"worst-source calibration cosine {value:.4f} (all int8: {info['all_int8_cosine']:.4f})",
    )
    if value < target:
        warn(
            f"quantize: the fidelity target is NOT met: worst calibration cosine {value:.4f} < target "
            f"{target} even with every quantizable node in float (what is left is the word-embedding int8 and "
            "the graph rewrites); lower the target or keep the model in float."
        )
    return dst, info
