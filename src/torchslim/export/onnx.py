"""ONNX export with a dynamic batch axis, checked numerically against PyTorch on real inputs."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.data.spec import InputSpec
from torchslim.errors import ExportError

OUTPUT_NAME = "output"


@contextlib.contextmanager
def _quiet():
    """The exporters narrate every step; keep the user's terminal for our own messages."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def _export_dynamo(model: nn.Module, example: torch.Tensor, path: Path, spec: InputSpec, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(model, (example,), None, input_names=[spec.name], output_names=[OUTPUT_NAME],
                                dynamo=True, dynamic_shapes=({0: batch},), opset_version=opset,
                                verbose=False, optimize=True)
    program.save(str(path), external_data=False)


def _export_torchscript(model: nn.Module, example: torch.Tensor, path: Path, spec: InputSpec, opset: int) -> None:
    torch.onnx.export(model, (example,), str(path), input_names=[spec.name], output_names=[OUTPUT_NAME],
                      dynamo=False, opset_version=opset,
                      dynamic_axes={spec.name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})


EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(model: nn.Module, path: Path, spec: InputSpec, exporter: str = "dynamo",
                opset: int = 18) -> Path:
    """Write `model` to `path` (atomically). The dynamo exporter is tried first; if it cannot handle
    the model, the TorchScript exporter is tried, and if both fail the error names the cause."""
    model = model.eval()
    example = spec.example(2)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    order = [exporter] + [name for name in EXPORTERS if name != exporter]
    errors = []
    for name in order:
        try:
            with _quiet(), torch.no_grad():
                EXPORTERS[name](model, example, tmp, spec, opset)
            os.replace(tmp, path)
            return path
        except Exception as exc:  # each exporter raises its own error types; report them together
            errors.append(f"{name} exporter: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}")
            tmp.unlink(missing_ok=True)
    raise ExportError(f"Could not export {type(model).__name__} to ONNX. " + " | ".join(errors) +
                      " Replace or ignore the module named there, or use measure.runtime: pytorch.")


def onnx_outputs(session, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: inputs[i:i + batch_size]})[0]
                           for i in range(0, len(inputs), batch_size)])


def verify_onnx(model: nn.Module, session, inputs: torch.Tensor, tolerance: float = 1e-4) -> float:
    """Max abs difference between PyTorch and the ONNX artifact on `inputs`; an ExportError above tolerance."""
    model.eval()
    with torch.inference_mode():
        reference = model(inputs).float().numpy()
    got = onnx_outputs(session, inputs.numpy())
    if got.shape != reference.shape:
        raise ExportError(f"The ONNX artifact returns shape {list(got.shape)}, PyTorch {list(reference.shape)}.")
    diff = float(np.abs(got - reference).max())
    if not diff <= tolerance:
        raise ExportError(f"The ONNX artifact disagrees with PyTorch: max abs difference {diff:.3g} on "
                          f"{len(inputs)} real inputs exceeds the tolerance {tolerance:g} "
                          "(measure.tolerance). The export is not trustworthy; report this model.")
    return diff
