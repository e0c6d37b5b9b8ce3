"""ONNX export with dynamic axes (batch; sequence for text models), checked numerically against PyTorch
on real inputs."""

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


def _export_dynamo(model: nn.Module, args: tuple, path: Path, names: list[str], axes: list[dict], opset: int) -> None:
    dims: dict[str, torch.export.Dim] = {}
    for ax in axes:
        for label in ax.values():  # min 2: a size-1 example would specialise the axis
            dims.setdefault(label, torch.export.Dim(label, min=1 if label == "batch" else 2, max=65536))
    shapes = tuple({i: dims[label] for i, label in ax.items()} for ax in axes)
    program = torch.onnx.export(model, args, None, input_names=names, output_names=[OUTPUT_NAME],
                                dynamo=True, dynamic_shapes=shapes, opset_version=opset,
                                verbose=False, optimize=True)
    program.save(str(path), external_data=False)


def _export_torchscript(model: nn.Module, args: tuple, path: Path, names: list[str], axes: list[dict],
                        opset: int) -> None:
    dynamic = {name: ax for name, ax in zip(names, axes)}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    torch.onnx.export(model, args, str(path), input_names=names, output_names=[OUTPUT_NAME],
                      dynamo=False, opset_version=opset, dynamic_axes=dynamic)


EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(model: nn.Module, path: Path, spec: InputSpec, exporter: str = "dynamo",
                opset: int = 18) -> Path:
    """Write `model` to `path` (atomically) with a dynamic batch axis. The dynamo exporter is tried
    first; if it cannot handle the model, the TorchScript exporter is tried, and if both fail the
    error names the cause."""
    return export_inputs(model, path, (spec.example(2),), [spec.name], [{0: "batch"}], exporter, opset)


def export_inputs(model: nn.Module, path: Path, args: tuple, names: list[str], axes: list[dict[int, str]],
                  exporter: str = "dynamo", opset: int = 18) -> Path:
    """Export a model of several inputs (`names`), each with its dynamic axes ({axis: label}, labels
    shared between inputs, e.g. {0: "batch", 1: "sequence"})."""
    model = model.eval()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    order = [exporter] + [name for name in EXPORTERS if name != exporter]
    errors = []
    for name in order:
        try:
            with _quiet(), torch.no_grad():
                EXPORTERS[name](model, args, tmp, names, axes, opset)
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
