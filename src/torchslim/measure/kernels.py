"""Which kernels ONNX Runtime really runs: the graph it executes after its own optimisations on this
CPU (read back through `optimized_model_filepath`), its compute nodes sorted into integer, weight-only
and float kernels.

A QDQ graph only *asks* for int8: ONNX Runtime fuses DequantizeLinear -> Conv -> QuantizeLinear into
QLinearConv only where it has a kernel for that scheme on this CPU, and otherwise runs the float Conv
between the Q/DQ pairs (slower than plain float). Counting the optimised graph is the only honest way
to say "int8"."""

from __future__ import annotations

import functools
import tempfile
from collections import Counter
from pathlib import Path

import onnx

# nodes that carry a model's arithmetic; everything else moves, reshapes or normalises data
INTEGER = frozenset(
    {
        "QLinearConv",
        "QLinearMatMul",
        "QGemm",
        "ConvInteger",
        "MatMulInteger",
        "QAttention",
        "DynamicQuantizeMatMul",
        "MatMulIntegerToFloat",
        "DynamicQuantizeLSTM",
        "QLinearConvTranspose",
        "NhwcQLinearConv",
    }
)
WEIGHT_ONLY = frozenset({"MatMulNBits", "MatMulBnb4"})  # low-bit weights, dequantized inside the kernel
FLOAT = frozenset(
    {
        "Conv",
        "ConvTranspose",
        "MatMul",
        "Gemm",
        "FusedConv",
        "FusedGemm",
        "FusedMatMul",
        "NhwcFusedConv",
        "Attention",
        "MultiHeadAttention",
        "GroupQueryAttention",
        "LSTM",
        "GRU",
        "RNN",
        "Einsum",
    }
)


def optimized_graph(path: Path, threads: int = 1) -> onnx.ModelProto:
    """The graph ONNX Runtime executes for `path` on this machine (all graph optimisations, CPU)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        return onnx.load(opts.optimized_model_filepath)


def kernel_counts(path: Path, threads: int = 1) -> dict:
    """{"integer": n, "weight_only": n, "float": n, "by_op": {op: n}, "float_nodes": [names]} for the
    compute nodes of the optimised graph. Remembered per file (path, size, modification time): a
    lowering stage counts its artifact and the measurement after it reads the same file."""
    stat = Path(path).stat()
    return dict(_counts(str(path), stat.st_size, stat.st_mtime_ns, threads))


@functools.lru_cache(maxsize=64)
def _counts(path: str, size: int, mtime_ns: int, threads: int) -> dict:
    try:
        graph = optimized_graph(path, threads).graph
    except Exception as exc:  # e.g. a graph over 2 GB cannot be written back as one file
        return {
            "integer": 0,
            "weight_only": 0,
            "float": 0,
            "by_op": {},
            "float_nodes": [],
            "error": f"could not read ONNX Runtime's optimised graph: {type(exc).__name__}: {exc}"[:400],
        }
    by_op: Counter = Counter()
    float_nodes = []
    for node in graph.node:
        if node.op_type in INTEGER | WEIGHT_ONLY | FLOAT:
            by_op[node.op_type] += 1
            if node.op_type in FLOAT:
                float_nodes.append(node.name or node.op_type)
    count = lambda ops: sum(n for op, n in by_op.items() if op in ops)  # noqa: E731
    return {
        "integer": count(INTEGER),
        "weight_only": count(WEIGHT_ONLY),
        "float": count(FLOAT),
        "by_op": dict(sorted(by_op.items())),
        "float_nodes": float_nodes,
    }


def describe(counts: dict) -> str:
    """'10 of 12 compute nodes on integer kernels (QLinearConv 10), 2 float (Conv 2)'."""
    if "error" in counts:
        return counts["error"]
    total = counts["integer"] + counts["weight_only"] + counts["float"]
    parts = lambda ops: ", ".join(f"{op} {n}" for op, n in counts["by_op"].items() if op in ops)  # noqa: E731
    text = f"{counts['integer']} of {total} compute nodes on integer kernels"
    if counts["integer"]:
        text += f" ({parts(INTEGER)})"
    if counts["weight_only"]:
        text += f", {counts['weight_only']} weight-only low-bit ({parts(WEIGHT_ONLY)})"
    if counts["float"]:
        text += f", {counts['float']} float ({parts(FLOAT)})"
    return text
