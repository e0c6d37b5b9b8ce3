"""Predictors: `predict(*inputs) -> numpy array` from the PyTorch model or from the served ONNX
Runtime session, so a metric is always computed from the runtime that serves the model."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from torch import nn

from torchslim.export.common import complete_feed
from torchslim.measure.latency import torch_threads

Inputs = tuple  # a tuple of tensors, batch first
Predictor = Callable[..., np.ndarray]


def torch_predictor(model: nn.Module, threads: int | None = None) -> Predictor:
    """`predict(*inputs)` with the PyTorch model (eval mode, inference mode, float32 numpy out)."""
    model.eval()

    def predict(*inputs):
        with torch.inference_mode():
            if threads is None:
                return model(*inputs).float().numpy()
            with torch_threads(threads):
                return model(*inputs).float().numpy()

    return predict


def onnx_predictor(session) -> Predictor:
    """`predict(*inputs)` with an ONNX Runtime session (its first output)."""
    names = [i.name for i in session.get_inputs()]

    def predict(*inputs):
        return session.run(None, complete_feed(session, {n: t.numpy() for n, t in zip(names, inputs)}))[0]

    return predict


def batched(predict: Predictor, inputs: Inputs, batch_size: int) -> np.ndarray:
    """`predict` over `inputs` in batches, outputs concatenated."""
    n = len(inputs[0])
    return np.concatenate([predict(*(t[i : i + batch_size] for t in inputs)) for i in range(0, n, batch_size)])


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|x|^2 / |x - q(x)|^2)."""
    noise = float(np.sum((np.asarray(reference, np.float64) - approx) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(np.asarray(reference, np.float64) ** 2)) / noise)
