"""One measurement for all: the pipeline calls `measure` after every stage, the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.context import RunContext
from torchslim.errors import ExportError
from torchslim.export.onnx import export_onnx, onnx_outputs, verify_onnx
from torchslim.measure.kernels import kernel_counts
from torchslim.measure.latency import onnxruntime_latency, ort_session, pytorch_latency, torch_threads
from torchslim.measure.model_stats import count_flops, count_params, peak_inference_bytes
from torchslim.measure.task import TASKS
from torchslim.models.io import save_weights

__all__ = ["measure", "count_params", "count_flops", "peak_inference_bytes", "pytorch_latency",
           "onnxruntime_latency", "model_size_bytes"]


def model_size_bytes(model: nn.Module, path: Path) -> int:
    """Bytes of the model's weights written to disk as safetensors at `path`."""
    return save_weights(model, Path(path)).stat().st_size


def lowered_agreement(model: nn.Module, session, path: Path, inputs: torch.Tensor) -> dict:
    """How a lowered artifact relates to (a) its own QDQ graph simulated in float (ONNX Runtime with
    graph optimisations off, i.e. the fake-quant model) and (b) the float PyTorch model."""
    import onnxruntime as ort

    from torchslim.quantize.observers import sqnr_db
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    simulated = onnx_outputs(ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"]),
                             inputs.numpy())
    lowered = onnx_outputs(session, inputs.numpy())
    with torch.inference_mode():
        reference = model.eval()(inputs).float().numpy()
    return {"fake_quant_max_abs_diff": float(np.abs(lowered - simulated).max()),
            "fake_quant_sqnr_db": sqnr_db(simulated, lowered),
            "float_sqnr_db": sqnr_db(reference, lowered),
            "float_top1_agreement": float((lowered.argmax(1) == reference.argmax(1)).mean())}


def _pytorch_outputs(model: nn.Module, x: torch.Tensor, batch_size: int, threads: int) -> np.ndarray:
    model.eval()
    with torch_threads(threads), torch.inference_mode():
        return torch.cat([model(x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]).numpy()


def measure(model: nn.Module, ctx: RunContext, out_dir: Path, onnx_path: Path | None = None) -> tuple[dict, Path]:
    """Measure `model` and write its artifacts into `out_dir`. Returns (metrics, artifact path).

    The artifact is the file the serving runtime loads (ONNX for onnxruntime, safetensors for
    pytorch); the task metric is computed from *that runtime's* outputs on the held-out test split.
    `onnx_path` reuses an ONNX file a stage already wrote and verified."""
    cfg = ctx.recipe.measure
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval().cpu()
    test_x, test_y = ctx.test_tensors()
    weights = out_dir / "model.safetensors"
    metrics: dict = {**count_params(model), "weights_bytes": model_size_bytes(model, weights)}
    metrics["storage_bytes"] = metrics["weights_bytes"]
    if metrics["nonzero_params"] < 0.75 * metrics["params"]:  # worth storing sparsely
        from torchslim.prune.sparse import save_sparse
        sparse = save_sparse(model, out_dir / "model.sparse.safetensors")
        metrics["sparse_bytes"] = sparse.stat().st_size
        metrics["storage_bytes"] = min(metrics["weights_bytes"], metrics["sparse_bytes"])
    one = test_x[:1]
    if cfg.flops:
        metrics["flops"] = count_flops(model, one)
    batch = ctx.real_batch(cfg.batch_size)
    quantized = ctx.artifact_onnx is not None  # the float module is no longer what is served
    latency = {} if quantized else {"pytorch": pytorch_latency(model, batch, cfg.threads, cfg.warmup, cfg.repeats)}
    session = None
    try:
        onnx_path = onnx_path or ctx.artifact_onnx or export_onnx(model, out_dir / "model.onnx", ctx.data.input,
                                                                    ctx.exporter)
        session = ort_session(onnx_path, cfg.threads)
        if quantized:
            metrics.update(lowered_agreement(model, session, onnx_path, test_x[:cfg.verify_samples]))
        else:
            metrics["onnx_max_abs_diff"] = verify_onnx(model, session, test_x[:cfg.verify_samples], cfg.tolerance)
        metrics["onnx_bytes"] = onnx_path.stat().st_size
        metrics["kernels"] = kernel_counts(onnx_path, cfg.threads)  # what ONNX Runtime really runs here
        latency["onnxruntime"] = onnxruntime_latency(onnx_path, batch.numpy(), cfg.threads, cfg.warmup,
                                                     cfg.repeats, session)
    except ExportError:
        if cfg.runtime == "onnxruntime":
            raise
    if cfg.runtime == "onnxruntime":
        outputs, artifact = onnx_outputs(session, test_x.numpy(), ctx.recipe.data.eval_batch_size), onnx_path
    else:
        outputs = _pytorch_outputs(model, test_x, ctx.recipe.data.eval_batch_size, cfg.threads)
        artifact = weights
    metrics.update(TASKS[ctx.recipe.task](outputs, test_y.numpy()))
    metrics["size_bytes"] = artifact.stat().st_size
    if quantized:
        metrics["storage_bytes"] = min(metrics["storage_bytes"], metrics["size_bytes"])
    metrics["latency_ms"] = latency[cfg.runtime]
    metrics["latency"] = latency
    if cfg.memory:
        metrics["peak_inference_bytes"] = peak_inference_bytes(model, batch)
    metrics["eval_examples"] = len(test_y)
    return metrics, artifact
