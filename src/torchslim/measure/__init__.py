"""One measurement for all: the pipeline calls `measure` after every stage, the same way."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from torchslim.errors import ExportError
from torchslim.export.onnx import verify_onnx
from torchslim.measure.kernels import kernel_counts
from torchslim.measure.latency import onnxruntime_latency, ort_session, pytorch_latency
from torchslim.measure.model_stats import count_flops, count_params, peak_inference_bytes
from torchslim.measure.predict import batched, onnx_predictor, sqnr_db, torch_predictor
from torchslim.models.io import save_weights
from torchslim.models.sparse import save_sparse, worth_storing_sparse

__all__ = [
    "measure",
    "lowered_agreement",
    "count_params",
    "count_flops",
    "peak_inference_bytes",
    "pytorch_latency",
    "onnxruntime_latency",
    "model_size_bytes",
]


def model_size_bytes(model: nn.Module, path: Path) -> int:
    """Bytes of the model's weights written to disk as safetensors at `path`."""
    return save_weights(model, Path(path)).stat().st_size


def lowered_agreement(model: nn.Module, session, path: Path, inputs, batch_size: int = 256, agreement=None) -> dict:
    """How a lowered artifact relates to (a) its own graph simulated in float (ONNX Runtime with graph
    optimisations off: the fake-quant model) and (b) the float PyTorch model, on `inputs` (a tensor or
    a tuple of the model's inputs). `agreement(reference, lowered)` adds task-specific numbers."""
    import numpy as np
    import onnxruntime as ort

    x = inputs if isinstance(inputs, tuple) else (inputs,)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    simulated = batched(
        onnx_predictor(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])), x, batch_size
    )
    lowered = batched(onnx_predictor(session), x, batch_size)
    reference = batched(torch_predictor(model), x, batch_size)
    return {
        "fake_quant_max_abs_diff": float(np.abs(lowered - simulated).max()),
        "fake_quant_sqnr_db": sqnr_db(simulated, lowered),
        "float_sqnr_db": sqnr_db(reference, lowered),
        **(agreement(reference, lowered) if agreement else {}),
    }


def measure(model: nn.Module, ctx, out_dir: Path, onnx_path: Path | None = None) -> tuple[dict, Path]:
    """Measure `model` and write its artifacts into `out_dir`. Returns (metrics, artifact path).

    The artifact is the file the serving runtime loads (ONNX for onnxruntime, safetensors for
    pytorch); the task's metrics are computed from *that runtime's* outputs on the held-out data.
    `onnx_path` reuses an ONNX file a stage already wrote; after a lowering stage `ctx.artifact` is
    what is served and measured."""
    cfg, task = ctx.recipe.measure, ctx.task
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    weights = out_dir / "model.safetensors"
    metrics: dict = {**count_params(model), "weights_bytes": model_size_bytes(model, weights)}
    metrics["storage_bytes"] = metrics["weights_bytes"]
    if metrics["nonzero_params"] < metrics["params"] and worth_storing_sparse(model):
        sparse = save_sparse(model, out_dir / "model.sparse.safetensors")
        metrics["sparse_bytes"] = sparse.stat().st_size
        metrics["storage_bytes"] = min(metrics["weights_bytes"], metrics["sparse_bytes"])
    if cfg.flops:
        metrics["flops"] = count_flops(model, task.example(1))
    batch = task.example(cfg.batch_size)
    lowered = ctx.artifact is not None  # the float module is no longer what is served
    latency = {} if lowered else {"pytorch": pytorch_latency(model, batch, cfg.threads, cfg.warmup, cfg.repeats)}
    session = None
    try:
        onnx_path = onnx_path or ctx.artifact or task.export(model, out_dir / "model.onnx", ctx.exporter)
        session = ort_session(onnx_path, cfg.threads)
        if lowered:
            metrics.update(task.lowered_agreement(model, session, onnx_path))
        else:
            metrics["onnx_max_abs_diff"] = verify_onnx(
                model, session, task.verify_inputs(cfg.verify_samples), cfg.tolerance, task.relative_tolerance
            )
        metrics["onnx_bytes"] = onnx_path.stat().st_size
        metrics["kernels"] = kernel_counts(onnx_path, cfg.threads)  # what ONNX Runtime really runs here
        latency["onnxruntime"] = onnxruntime_latency(
            onnx_path, task.feed(batch), cfg.threads, cfg.warmup, cfg.repeats, session
        )
        metrics.update(task.serving(model, onnx_path, cfg.threads))
    except ExportError:
        if cfg.runtime == "onnxruntime":
            raise
    if cfg.runtime == "onnxruntime":
        predict, artifact = onnx_predictor(session), onnx_path
    else:
        predict, artifact = torch_predictor(model, cfg.threads), weights
    metrics.update(task.evaluate(predict))
    metrics["size_bytes"] = artifact.stat().st_size
    if lowered:
        metrics["storage_bytes"] = min(metrics["storage_bytes"], metrics["size_bytes"])
    metrics["latency_ms"] = latency[cfg.runtime]
    metrics["latency"] = latency
    if cfg.memory:
        metrics["peak_inference_bytes"] = peak_inference_bytes(model, batch)
    return metrics, artifact
