"""Lowering to real int8 kernels with ONNX Runtime's own quantization tooling.

torchslim calibrates (observers.py on real batches) and decides (which layers, which scheme);
ONNX Runtime's quantizer writes the QDQ graph from *our* ranges (handed over through its
calibration cache), and its CPU kernels execute it. Weight-only int4/int8 uses its MatMulNBits."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from torchslim.errors import TorchslimError
from torchslim.io import replacing
from torchslim.log import steps
from torchslim.quantize.observers import OBSERVERS

QUANTIZABLE = ("Conv", "Gemm", "MatMul")


def atomic_output(fn):
    """`fn(src, dst, ...)` writes a temporary file beside `dst`, renamed to `dst` once complete: a crash
    never leaves a half-written artifact that a resume or a later stage would read as finished."""

    @functools.wraps(fn)
    def wrapper(src, dst, *args, **kwargs):
        with replacing(dst, keep_suffix=True) as tmp:  # ONNX Runtime's quantizers go by the suffix
            fn(src, tmp, *args, **kwargs)
        return Path(dst)

    return wrapper


@contextlib.contextmanager
def quiet():
    """ORT's quantizer prints progress to stdout and logs warnings; keep the terminal for ours."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            logger.setLevel(level)


def module_path(node: onnx.NodeProto) -> str:
    """The PyTorch module a node came from, read from the exporter's `namespace` metadata (for a
    convolution with batch norm folded in, that is the batch-norm module); else the node's name."""
    meta = {p.key: p.value for p in node.metadata_props}
    segments = [seg.split(": ", 1) for seg in meta.get("namespace", "").split("/")]
    modules = [
        seg[0].strip() for seg in segments if len(seg) == 2 and seg[0].strip() and not seg[1].startswith("aten.")
    ]
    return modules[-1] if modules else node.name


def node_modules(node: onnx.NodeProto) -> list[str]:
    """Every PyTorch module path in a node's `namespace` metadata, outermost first."""
    meta = {p.key: p.value for p in node.metadata_props}
    segments = [seg.split(": ", 1) for seg in meta.get("namespace", "").split("/")]
    return [seg[0].strip() for seg in segments if len(seg) == 2 and seg[0].strip() and not seg[1].startswith("aten.")]


def layer_tensors(model_path: Path, layers: Iterable[str]) -> dict[str, tuple[str, str]]:
    """{layer path: (node name, input tensor name)} for the quantizable node each of `layers` became."""
    wanted = set(layers)
    out = {}
    for node in onnx.load(str(model_path)).graph.node:
        if node.op_type in QUANTIZABLE:
            match = [m for m in node_modules(node) if m in wanted]
            if match:
                out[match[-1]] = (node.name, node.input[0])
    return out


# ops whose output ONNX Runtime's QDQ quantizer gives the same scale as their input
SHARED_SCALE = ("MaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def upstream_of(model_path: Path, tensor: str) -> list[str]:
    """`tensor` and the tensors it is computed from through SHARED_SCALE ops (a max-pool's input): a
    range set for `tensor` must be set for these too, or the quantizer's sharing rule overrides it."""
    producer = {o: n for n in onnx.load(str(model_path)).graph.node for o in n.output}
    chain = [tensor]
    while chain[-1] in producer and producer[chain[-1]].op_type in SHARED_SCALE:
        chain.append(producer[chain[-1]].input[0])
    return chain


def float_weights(model_path: Path) -> dict[str, np.ndarray]:
    """{node name: float weight} of the quantizable nodes of a float graph."""
    model = onnx.load(str(model_path))
    inits = {i.name: i for i in model.graph.initializer}
    return {
        n.name: numpy_helper.to_array(inits[n.input[1]])
        for n in model.graph.node
        if n.op_type in QUANTIZABLE and len(n.input) > 1 and n.input[1] in inits
    }


def set_weight_scales(
    model: onnx.ModelProto, scales: dict[str, Sequence[float]], weights: dict[str, np.ndarray], qmax: int = 127
) -> list[str]:
    """Give the int8 weights of the named quantizable nodes the per-channel `scales` they were trained
    with (QAT): each float weight (`weights`, from the float graph) re-quantized on that grid, the
    int32 bias rescaled to match. A weight that is not on the trained grid (batch norm folded into it
    on export), or whose grid needs more than `qmax` levels (7-bit weights under reduce_range), keeps
    the quantizer's scale. Returns the nodes changed."""
    inits = {i.name: i for i in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    changed = []
    for node in model.graph.node:
        if node.name not in scales or node.name not in weights or node.op_type not in QUANTIZABLE:
            continue
        dq = producer.get(node.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or not all(n in inits for n in dq.input[:2]):
            continue
        q = numpy_helper.to_array(inits[dq.input[0]])
        w = weights[node.name].astype(np.float64)
        old = numpy_helper.to_array(inits[dq.input[1]])
        new = np.asarray(scales[node.name], np.float64)
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if q.dtype != np.int8 or q.shape != w.shape or old.size != new.size or new.size != q.shape[axis]:
            continue
        shape = [1] * q.ndim
        shape[axis] = new.size
        grid = w / new.reshape(shape)
        if np.abs(grid - np.round(grid)).max() > 1e-3 or np.abs(np.round(grid)).max() > qmax:
            continue
        inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.round(grid).astype(np.int8), dq.input[0]))
        inits[dq.input[1]].CopyFrom(numpy_helper.from_array(new.astype(np.float32).reshape(old.shape), dq.input[1]))
        changed.append(node.name)
    _rescale_biases(model, inits)
    return changed


def quantizable_nodes(model_path: Path) -> list[tuple[str, str, str]]:
    """(node name, op type, module path) of every node static quantization may lower to int8."""
    model = onnx.load(str(model_path))
    return [(n.name, n.op_type, module_path(n)) for n in model.graph.node if n.op_type in QUANTIZABLE]


def preprocess(src: Path, dst: Path) -> Path:
    from onnxruntime.quantization import quant_pre_process

    with quiet():
        quant_pre_process(str(src), str(dst), skip_symbolic_shape=True)
    return dst


def activation_ranges(
    model_path: Path, batches: Iterable, observer: str = "minmax", bits: int = 8, tensors: Sequence[str] | None = None
) -> dict[str, tuple[float, float]]:
    """Run real batches through the float model and observe every float tensor (or the named
    `tensors`). A batch is an array for the first input, or a dict of arrays by input name."""
    import onnxruntime as ort

    model = onnx.load(str(model_path))
    inits = {i.name for i in model.graph.initializer}
    names = (
        list(tensors)
        if tensors is not None
        else [model.graph.input[0].name] + [o for n in model.graph.node for o in n.output if o and o not in inits]
    )
    known = {o.name for o in model.graph.output}
    for name in names:
        if name not in known:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    outputs = [o.name for o in session.get_outputs()]
    floats = [o for o in outputs if o in set(names)]
    observers = {name: OBSERVERS[observer](bits) for name in floats}
    input_name = session.get_inputs()[0].name
    seen, batches = 0, list(batches)
    with steps("calibration", len(batches)) as progress:
        for batch in batches:
            values = session.run(floats, batch if isinstance(batch, dict) else {input_name: batch})
            for name, value in zip(floats, values):
                if np.issubdtype(np.asarray(value).dtype, np.floating):
                    observers[name].update(value)
            seen += 1
            progress.advance()
    if not seen:
        raise TorchslimError("calibration needs at least one batch of real inputs.")
    return {name: obs.range() for name, obs in observers.items() if obs.samples}


@atomic_output
def static_int8(
    src: Path,
    dst: Path,
    batches: Iterable[np.ndarray] | None = None,
    observer: str = "minmax",
    per_channel: bool = True,
    symmetric_activations: bool = False,
    reduce_range: bool = False,
    activation_type: str = "int8",
    nodes_to_exclude: Sequence[str] = (),
    nodes_to_quantize: Sequence[str] | None = None,
    weight_bits: int = 8,
    ranges: dict | None = None,
    preprocessed: bool = False,
) -> Path:
    """Static post-training quantization in QDQ format (S8S8 by default, the recommended CPU setting).
    To quantize one model several ways, run `preprocess` and `activation_ranges` once and pass
    `preprocessed=True` and `ranges`."""
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        TensorData,
        TensorsData,
        quantize_static,
        save_tensors_data,
    )

    with tempfile.TemporaryDirectory() as tmp:
        pre = src if preprocessed else preprocess(src, Path(tmp) / "pre.onnx")
        ranges = ranges if ranges is not None else activation_ranges(pre, batches, observer)
        cache = Path(tmp) / "ranges.json"
        save_tensors_data(
            TensorsData(
                CalibrationMethod.MinMax,
                {
                    name: TensorData(lowest=np.array(lo, np.float32), highest=np.array(hi, np.float32))
                    for name, (lo, hi) in ranges.items()
                },
            ),
            cache,
        )
        # DefaultTensorType: ONNX shape inference does not type the outputs of fused contrib ops
        extra = {
            "ActivationSymmetric": symmetric_activations,
            "WeightSymmetric": True,
            "DefaultTensorType": TensorProto.FLOAT,
        }
        with quiet():
            quantize_static(
                str(pre),
                str(dst),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=per_channel,
                reduce_range=reduce_range,
                activation_type=QuantType.QInt8 if activation_type == "int8" else QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                nodes_to_quantize=list(nodes_to_quantize or []) or None,
                nodes_to_exclude=list(nodes_to_exclude) or None,
                calibration_cache_path=str(cache),
                extra_options=extra,
            )
    if weight_bits < 8:  # narrower weights in int8 containers: the same int8 kernels, fewer levels
        onnx.save(narrow_weights(onnx.load(str(dst)), weight_bits), str(dst))
    return dst


def narrow_weights(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """Re-quantize every int8 weight of a QDQ graph to the signed `bits`-bit grid [-(2^(b-1)-1), 2^(b-1)-1]
    (per channel where the weight is per channel), rescaling its DequantizeLinear scale to match."""
    qmax = 2 ** (bits - 1) - 1
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = numpy_helper.to_array(inits[node.input[0]])
        if q.dtype != np.int8 or node.input[1] not in inits:
            continue
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        shape = [1] * q.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[axis] = scale.size
        w = q.astype(np.float32) * scale.reshape(shape)
        reduce = tuple(d for d in range(q.ndim) if shape[d] == 1)
        amax = np.abs(w).max(axis=reduce, keepdims=True) if scale.size > 1 else np.abs(w).max()
        new_scale = np.maximum(amax / qmax, 1e-12).astype(np.float32)
        new_q = np.clip(np.round(w / new_scale), -qmax, qmax).astype(np.int8)
        inits[node.input[0]].CopyFrom(numpy_helper.from_array(new_q, node.input[0]))
        inits[node.input[1]].CopyFrom(numpy_helper.from_array(new_scale.reshape(scale.shape), node.input[1]))
    _rescale_biases(model, inits)
    return model


def _rescale_biases(model: onnx.ModelProto, inits: dict) -> None:
    """int32 biases are stored at scale x_scale * w_scale; keep that true after weights were rescaled."""
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.op_type not in QUANTIZABLE or len(node.input) < 3:
            continue
        dq = [producer.get(i) for i in node.input[:3]]
        if any(d is None or d.op_type != "DequantizeLinear" for d in dq):
            continue
        x_dq, w_dq, b_dq = dq
        if not all(n in inits for n in (x_dq.input[1], w_dq.input[1], b_dq.input[0], b_dq.input[1])):
            continue
        b_q = numpy_helper.to_array(inits[b_dq.input[0]])
        if b_q.dtype != np.int32:
            continue
        bias = b_q.astype(np.float64) * numpy_helper.to_array(inits[b_dq.input[1]]).astype(np.float64)
        new_scale = (
            numpy_helper.to_array(inits[x_dq.input[1]]).astype(np.float32)
            * numpy_helper.to_array(inits[w_dq.input[1]]).astype(np.float32)
        ).reshape(-1)
        new_q = np.clip(
            np.round(bias / (new_scale if new_scale.size > 1 else new_scale[0])), -(2**31), 2**31 - 1
        ).astype(np.int32)
        old_shape = numpy_helper.to_array(inits[b_dq.input[1]]).shape
        inits[b_dq.input[0]].CopyFrom(numpy_helper.from_array(new_q, b_dq.input[0]))
        inits[b_dq.input[1]].CopyFrom(numpy_helper.from_array(new_scale.reshape(old_shape), b_dq.input[1]))


def gemm_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
    """Gemm(x, W^T, b) -> MatMul(x, W') + b, which ORT's dynamic and weight-only quantizers handle."""
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for n in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        if (
            n.op_type != "Gemm"
            or n.input[1] not in inits
            or attrs.get("transA", 0)
            or attrs.get("alpha", 1.0) != 1.0
            or attrs.get("beta", 1.0) != 1.0
        ):
            nodes.append(n)
            continue
        w = numpy_helper.to_array(inits[n.input[1]])
        w = w.T if attrs.get("transB", 0) else w
        name = n.input[1] + "_matmul"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(w), name))
        if len(n.input) > 2 and n.input[2]:
            mid = n.output[0] + "_mm"
            nodes.append(helper.make_node("MatMul", [n.input[0], name], [mid], name=n.name + "_MatMul"))
            nodes.append(helper.make_node("Add", [mid, n.input[2]], [n.output[0]], name=n.name + "_Add"))
        else:
            nodes.append(helper.make_node("MatMul", [n.input[0], name], [n.output[0]], name=n.name + "_MatMul"))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    used = {i for n in model.graph.node for i in n.input}
    keep = [i for i in model.graph.initializer if i.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    return model


DYNAMIC_OPS = ("MatMul", "Attention", "LSTM")


@atomic_output
def dynamic_int8(
    src: Path,
    dst: Path,
    per_channel: bool = True,
    nodes_to_exclude: Sequence[str] = (),
    op_types: Sequence[str] = DYNAMIC_OPS,
    reduce_range: bool = False,
) -> Path:
    """Weights int8 ahead of time, activations quantized at run time (Linear/MatMul layers, and the
    fused Attention of an optimised transformer graph); `nodes_to_exclude` stay in float.
    `reduce_range`: 7-bit weights, so AVX2's u8 x s8 pair sums cannot saturate (see
    `cpu.has_int8_dot_product`)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        mm = Path(tmp) / "mm.onnx"
        onnx.save(gemm_to_matmul(onnx.load(str(src))), str(mm))
        with quiet():
            quantize_dynamic(
                str(mm),
                str(dst),
                per_channel=per_channel,
                reduce_range=reduce_range,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(op_types),
                nodes_to_exclude=list(nodes_to_exclude),
                # ONNX shape inference does not type the outputs of fused contrib ops
                extra_options={"DefaultTensorType": TensorProto.FLOAT},
            )
    return dst


@atomic_output
def weight_only(src: Path, dst: Path, bits: int = 4, group_size: int = 32, symmetric: bool = True) -> Path:
    """Group-wise int4/int8 weights packed into MatMulNBits nodes (dequantized inside the kernel)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = gemm_to_matmul(onnx.load(str(src)))
    with quiet():
        quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=group_size, is_symmetric=symmetric)
        quantizer.process()
        quantizer.model.save_model_to_file(str(dst), use_external_data_format=False)
    return dst


@atomic_output
def half(src: Path, dst: Path) -> Path:
    """fp16 weights and arithmetic, float32 inputs and outputs."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    with quiet():
        onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst
