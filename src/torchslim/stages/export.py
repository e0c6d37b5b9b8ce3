"""The `export` stage: write the deliverable artifacts, verified against PyTorch on real inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from torchslim.context import RunContext
from torchslim.export.onnx import export_onnx
from torchslim.registry import register_stage
from torchslim.report.json import atomic_write_text


class ExportConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format: Literal["onnx", "safetensors", "all"] = "onnx"
    exporter: Literal["dynamo", "torchscript"] = Field("dynamo", description="tried first; the other is the fallback")
    opset: int = Field(18, ge=13, le=23)


@register_stage("export", ExportConfig, changes_model=False)
def export(model, cfg: ExportConfig, ctx: RunContext):
    """Export the current model (ONNX with a dynamic batch axis, and/or safetensors weights)."""
    written = []
    if cfg.format in ("onnx", "all"):
        if ctx.artifact_onnx is not None:  # a quantized artifact is the deliverable, not a float re-export
            path = Path(shutil.copyfile(ctx.artifact_onnx, ctx.stage_dir / "model.onnx"))
            ctx.artifact_onnx = path
        else:
            path = export_onnx(model, ctx.stage_dir / "model.onnx", ctx.data.input, cfg.exporter, cfg.opset)
        ctx.onnx_path = path  # measured and verified by the pipeline's one measure call
        written.append(path.name)
    # safetensors weights are written by every measurement; the export stage lists them as a deliverable
    if cfg.format in ("safetensors", "all"):
        written.append("model.safetensors")
    atomic_write_text(ctx.stage_dir / "input.json", json.dumps(ctx.data.input.to_dict(), indent=2))
    ctx.stage_info["exported"] = written + ["input.json"]
    return model
