"""One measurement for all: the pipeline calls `measure` after every stage, the same way."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.context import RunContext
from torchslim.errors import ExportError
from torchslim.export.onnx import export_onnx, onnx_outputs, verify_onnx
from torchslim.measure.latency import onnxruntime_latency, ort_session, pytorch_latency, torch_threads
from torchslim.measure.model_stats import count_flops, count_params, peak_inference_bytes
from torchslim.measure.task import TASKS
from torchslim.models.io import save_weights

__all__ = ["measure", "count_params", "count_flops", "peak_inference_bytes", "pytorch_latency",
           "onnxruntime_latency", "model_size_bytes"]


def model_size_bytes(model: nn.Module, path: Path) -> int:
    """Bytes of the model's weights written to disk as safetensors at `path`."""
    return save_weights(model, Path(path)).stat().st_size


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
    latency = {"pytorch": pytorch_latency(model, batch, cfg.threads, cfg.warmup, cfg.repeats)}
    session = None
    try:
        onnx_path = onnx_path or export_onnx(model, out_dir / "model.onnx", ctx.data.input)
        session = ort_session(onnx_path, cfg.threads)
        metrics["onnx_max_abs_diff"] = verify_onnx(model, session, test_x[:cfg.verify_samples], cfg.tolerance)
        metrics["onnx_bytes"] = onnx_path.stat().st_size
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
    metrics["latency_ms"] = latency[cfg.runtime]
    metrics["latency"] = latency
    if cfg.memory:
        metrics["peak_inference_bytes"] = peak_inference_bytes(model, batch)
    metrics["eval_examples"] = len(test_y)
    return metrics, artifact
