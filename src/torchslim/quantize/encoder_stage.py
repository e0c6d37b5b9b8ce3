"""The embedding task's `quantize` (formerly `encoder_quantize`): ONNX Runtime int8 (per-channel
weights) of the fused graph's MatMul and Attention nodes and word embeddings — dynamic, or static for
the MatMuls with calibrated activation ranges — with cosine-driven float fallback on the calibration
sentences of every source."""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from torchslim.config import Strict
from torchslim.log import console
from torchslim.measure.kernels import describe, kernel_counts
from torchslim.models.hf import embed
from torchslim.quantize.encoder import fidelity_int8, fusion_counts
from torchslim.registry import register_alias, register_stage
from torchslim.results import Lowered

register_alias(
    "encoder_quantize",
    "quantize",
    "'encoder_quantize' is now 'quantize' (on a task: embedding recipe "
    "it does the same); the old name goes in the next release.",
)


class EncoderQuantizeConfig(Strict):
    method: Literal["dynamic", "static"] = Field(
        "dynamic",
        description="dynamic: int8 weights, activations "
        "quantized at run time (MatMul, Attention, word embeddings); "
        "static: MatMul in QDQ with min-max activation ranges from the "
        "calibration sentences; Attention and word embeddings, "
        "which have no static kernel, dynamic",
    )
    per_channel: bool = Field(True, description="one weight scale per output channel")
    target: float = Field(
        0.995,
        gt=0,
        le=1,
        description="worst source's mean calibration cosine to the float "
        "model being quantized; the most sensitive nodes stay in float until it is reached",
    )
    fuse: bool = Field(
        True,
        description="fuse attention, layer norm and GELU with ONNX Runtime's transformer "
        "optimizer before quantizing, then apply torchslim's CPU serving rewrites (layer norms out "
        "of SkipLayerNormalization, a softer attention mask)",
    )
    pad_free: bool = Field(
        True,
        description="with fuse: run everything but attention on the real tokens only "
        "(padded positions gathered out after the embeddings, scattered back around attention)",
    )


@register_stage("quantize", EncoderQuantizeConfig, compresses=True, tasks=("embedding",), lowers=True)
def encoder_quantize(model, cfg: EncoderQuantizeConfig, ctx):
    """Dynamic int8 (per-channel) of MatMul/Attention nodes with cosine-driven float fallback."""
    task = ctx.task
    float_onnx = task.export(model, ctx.stage_dir / "float.onnx", fuse=cfg.fuse, pad_free=cfg.pad_free)
    with torch.inference_mode():
        reference = {k: embed(model, task.tokenizer, s) for k, s in task.calibration_sentences.items()}
    path, info = fidelity_int8(
        float_onnx,
        task.tokenizer,
        task.calibration_sentences,
        reference,
        ctx.stage_dir / "model.onnx",
        cfg.target,
        ctx.recipe.measure.threads,
        cfg.per_channel,
        cfg.method,
    )
    info = {**info, "float_ops": fusion_counts(float_onnx), "int8_ops": fusion_counts(path)}
    console.log(f"quantize: ONNX Runtime runs {describe(kernel_counts(path, ctx.recipe.measure.threads))} on this CPU")
    float_onnx.unlink()
    return Lowered(model, {"encoder_int8": info}, artifact=path)
