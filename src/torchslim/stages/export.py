"""The `export` stage: write the deliverable artifacts, verified against PyTorch on real inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from torchslim.io import atomic_write_text
from torchslim.registry import register_stage
from torchslim.results import Exported


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["onnx", "safetensors", "all"] = Field(
        "onnx", description="model.onnx (verified against PyTorch), model.safetensors, or both"
    )
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="tried first; the other is the fallback")
    opset: int = Field(18, ge=13, le=23, description="ONNX opset of the export")


@register_stage("export", ExportConfig, changes_model=False)
def export(model, cfg: ExportConfig, ctx):
    """Export the current model (ONNX with a dynamic batch axis, and/or safetensors weights)."""
    written, path = [], None
    if cfg.format in ("onnx", "all"):
        if ctx.artifact is not None:  # a lowered artifact is the deliverable, not a float re-export
            path = Path(shutil.copyfile(ctx.artifact, ctx.stage_dir / "model.onnx"))
        else:
            path = ctx.task.export(model, ctx.stage_dir / "model.onnx", cfg.exporter, cfg.opset)
        written.append(path.name)  # measured and verified by the pipeline's one measure call
    # safetensors weights are written by every measurement; the export stage lists them as a deliverable
    if cfg.format in ("safetensors", "all"):
        written.append("model.safetensors")
    atomic_write_text(ctx.stage_dir / "input.json", json.dumps(ctx.task.input_spec(), indent=2))
    return Exported(model, {"exported": written + ["input.json"]}, onnx=path)
