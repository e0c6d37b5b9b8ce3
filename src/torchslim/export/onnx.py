"""ONNX export with dynamic axes (batch; sequence for text models), checked numerically against PyTorch
on real inputs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.data.spec import InputSpec
from torchslim.errors import ExportError
from torchslim.export.common import complete_feed, no_fused_encoder, quiet
from torchslim.io import replacing
from torchslim.log import warn

OUTPUT_NAME = "output"


def _export_dynamo(model: nn.Module, args: tuple, path: Path, names: list[str], axes: list[dict], opset: int) -> None:
    dims: dict[str, torch.export.Dim] = {}
    for ax in axes:
        for label in ax.values():  # min 2: a size-1 example would specialise the axis
            dims.setdefault(label, torch.export.Dim(label, min=1 if label == "batch" else 2, max=65536))
    shapes = tuple({i: dims[label] for i, label in ax.items()} for ax in axes)
    program = torch.onnx.export(
        model,
        args,
        None,
        input_names=names,
        output_names=[OUTPUT_NAME],
        dynamo=True,
        dynamic_shapes=shapes,
        opset_version=opset,
        verbose=False,
        optimize=True,
    )
    program.save(str(path), external_data=False)


def _export_torchscript(
    model: nn.Module, args: tuple, path: Path, names: list[str], axes: list[dict], opset: int
) -> None:
    dynamic = {name: ax for name, ax in zip(names, axes)}
    dynamic[OUTPUT_NAME] = {0: "batch"}
    torch.onnx.export(
        model,
        args,
        str(path),
        input_names=names,
        output_names=[OUTPUT_NAME],
        dynamo=False,
        opset_version=opset,
        dynamic_axes=dynamic,
    )


EXPORTERS = {"dynamo": _export_dynamo, "torchscript": _export_torchscript}


def export_onnx(model: nn.Module, path: Path, spec: InputSpec, exporter: str = "dynamo", opset: int = 18) -> Path:
    """Write `model` to `path` (atomically) with a dynamic batch axis. The dynamo exporter is tried
    first; if it cannot handle the model, the TorchScript exporter is tried, and if both fail the
    error names the cause."""
    return export_inputs(model, path, (spec.example(2),), [spec.name], [{0: "batch"}], exporter, opset)


def _data_dependent(exc: BaseException) -> str | None:
    """Where a dynamo export failed on Python control flow that depends on tensor values, as
    'File "...", line N: <code>', or None when it failed for another reason."""
    text = f"{exc}\n{exc.__cause__ or ''}"
    if (
        "GuardOnDataDependentSymNode" not in text
        and "data-dependent" not in text
        and "Dynamic control flow" not in text
    ):
        return None
    import re

    _, _, tail = text.partition("The following call raised this error:")
    found = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n(\s+\S.*)?', tail)
    if not found:
        return "a line torch.export did not name"
    file, line, func, code = found.groups()
    code = code.strip() if code and not code.strip().startswith("The error above") else ""
    return f"{file}, line {line}, in {func}" + (f": `{code}`" if code else "")


def _frozen_branches(caught: list) -> str | None:
    """The TorchScript tracer's own warning that it turned a tensor into a Python bool (a branch it
    followed once and froze)."""
    for w in caught:
        text = str(w.message)
        if "Python boolean" in text or "Python index" in text or "Python float" in text:
            return f"{w.filename}, line {w.lineno}"
    return None


def export_inputs(
    model: nn.Module,
    path: Path,
    args: tuple,
    names: list[str],
    axes: list[dict[int, str]],
    exporter: str = "dynamo",
    opset: int = 18,
) -> Path:
    """Export a model of several inputs (`names`), each with its dynamic axes ({axis: label}, labels
    shared between inputs, e.g. {0: "batch", 1: "sequence"}).

    The dynamo exporter (torch.export) is tried first. A model whose forward branches on tensor
    values (torch.export proves it: a guard on a data-dependent value) is refused, naming the line:
    an ONNX graph would keep one branch for every input. Other dynamo failures fall back to the
    TorchScript exporter, with a warning that says why. The tracer (as fallback, or asked for with
    `exporter="torchscript"`) warns where it fixed a traced value; it cannot tell a branch on values
    from one on sizes, so the export check's several batch sizes are the safeguard there."""
    model = model.eval()
    path = Path(path)
    name = type(model).__name__
    with replacing(path) as tmp:
        errors = []
        order = [exporter] + [other for other in EXPORTERS if other != exporter]
        for which in order:
            caught: list = []
            try:
                with quiet(), torch.no_grad(), no_fused_encoder(), warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    EXPORTERS[which](model, args, tmp, names, axes, opset)
            except OSError:
                raise  # a full disk is not an export failure
            except Exception as exc:  # each exporter raises its own error types; report them together
                Path(tmp).unlink(missing_ok=True)
                where = _data_dependent(exc) if which == "dynamo" else None
                if where is not None:
                    raise ExportError(
                        f"{name}'s forward has control flow that depends on the input's values ({where}). An ONNX "
                        "export would keep only the branch the example input took, for every input. Rewrite it with "
                        "torch.where or torch.cond, or, if one branch is right for all inputs, export with the "
                        "TorchScript tracer explicitly (export stage: {exporter: torchscript}), which freezes it."
                    ) from None
                errors.append(f"{which} exporter: {type(exc).__name__}: {str(exc).strip().splitlines()[0][:400]}")
                continue
            frozen = _frozen_branches(caught) if which == "torchscript" else None
            if frozen:  # the tracer cannot tell a branch on values from one on sizes: said, then checked
                warn(
                    f"export: the TorchScript tracer turned a traced tensor of {name} into a Python value at {frozen} "
                    "(a branch or a number fixed to the example input's); the ONNX graph keeps the example's choice "
                    "for every input, and the export check compares it with PyTorch on batches of several sizes."
                )
            if which != exporter:
                warn(
                    f"export: torch.export could not export {name} ({errors[0]}); the TorchScript tracer was used "
                    "instead, and the artifact is checked against PyTorch as always."
                )
            return path  # `replacing` renames the finished file to `path`
        raise ExportError(
            f"Could not export {name} to ONNX. "
            + " | ".join(errors)
            + " Replace or ignore the module named there, or use measure.runtime: pytorch."
        )


def onnx_outputs(session, inputs: np.ndarray, batch_size: int = 256) -> np.ndarray:
    name = session.get_inputs()[0].name
    return np.concatenate(
        [session.run(None, {name: inputs[i : i + batch_size]})[0] for i in range(0, len(inputs), batch_size)]
    )


def verify_onnx(
    model: nn.Module, session, inputs: torch.Tensor | tuple, tolerance: float = 1e-4, relative: bool = False
) -> float:
    """Max abs difference between PyTorch and the ONNX artifact on `inputs` (a tensor, or a tuple of
    the model's inputs with the batch first), fed as several batches of different sizes (1, 3, 16,
    then 64 at a time), so a graph that is right for one batch only shows; an ExportError above
    tolerance (`relative`: tolerance times the largest absolute PyTorch output, at least 1 — for
    outputs as large as a language model's logits, where float32 rounding alone exceeds 1e-4)."""
    model.eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    names = [i.name for i in session.get_inputs()]
    diff, total, scale = 0.0, len(args[0]), 1.0
    start, sizes = 0, [1, 3, 16]
    with torch.inference_mode():
        while start < total:
            step = sizes.pop(0) if sizes else 64
            chunk = tuple(a[start : start + step] for a in args)
            start += step
            reference = model(*chunk).float().numpy()
            got = session.run(None, complete_feed(session, {n: a.numpy() for n, a in zip(names, chunk)}))[0]
            if got.shape != reference.shape:
                raise ExportError(
                    f"The ONNX artifact returns shape {list(got.shape)}, PyTorch {list(reference.shape)}."
                )
            diff = max(diff, float(np.abs(got - reference).max()))
            if relative:
                scale = max(scale, float(np.abs(reference).max()))
    tolerance *= scale
    if not diff <= tolerance:
        raise ExportError(
            f"The ONNX artifact disagrees with PyTorch: max abs difference {diff:.3g} on "
            f"{total} real inputs exceeds the tolerance {tolerance:g} "
            "(measure.tolerance). The export is not trustworthy; report this model."
        )
    return diff
