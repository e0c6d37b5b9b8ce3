"""Stages of `task: embedding` recipes.

- `encoder_distill`: depth reduction (every k-th transformer layer, or the listed ones, kept with
  their weights) and hidden-state + embedding distillation from the float model on real sentences of
  `text.training_corpus` (fortune files and package phrases the evaluation never uses), on the one
  training loop with epoch checkpoints.
- `encoder_distill` can also remove attention heads and FFN neurons of the kept layers first.
- `encoder_quantize`: ONNX Runtime int8 (per-channel weights) of the fused graph's MatMul and
  Attention nodes and word embeddings — dynamic, or static for the MatMuls with calibrated activation
  ranges — with cosine-driven float fallback on the calibration sentences of every source."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import Field

from torchslim.distill.encoder import EncoderDistiller, drop_layers, sentence_dataset
from torchslim.encoders.run import EncoderContext
from torchslim.measure.kernels import describe, kernel_counts
from torchslim.models.hf import embed
from torchslim.models.io import load_weights, save_weights
from torchslim.prune.encoder import layer_shapes, prune_encoder
from torchslim.quantize.encoder import export_encoder, fidelity_int8, fusion_counts
from torchslim.recipe import Strict
from torchslim.registry import register_stage
from torchslim.train import TrainConfig, console

EMBEDDING = ("embedding",)


class EncoderDistillConfig(Strict):
    keep_every: int = Field(2, ge=1, le=12, description="keep every k-th transformer layer (always the last)")
    keep_layers: Optional[list[int]] = Field(None, min_length=1, description="the layer indices to keep "
                                             "(instead of keep_every), e.g. [0, 2, 4, 5]")
    train_sentences: int = Field(48000, ge=32, le=1_000_000, description="sentences of the training corpus used")
    head_ratio: float = Field(0.0, ge=0, lt=1, description="share of every kept layer's attention heads removed "
                              "(lowest L1) before the distillation")
    ffn_ratio: float = Field(0.0, ge=0, lt=1, description="share of every kept layer's FFN neurons removed "
                             "(lowest L1) before the distillation")
    max_length: int = Field(128, ge=8, le=512)
    embedding_weight: float = Field(1.0, ge=0, description="weight of 1 - cosine between sentence embeddings")
    hidden_weight: float = Field(1.0, ge=0, description="weight of the hidden-state MSE, student layer i vs "
                                 "the teacher layer it was copied from")
    # measured here: lr 5e-4 for one epoch over 48,000 sentences took 3 kept layers from 0.73 to 0.90
    # calibration cosine; lr 1e-4 reached 0.81 after 500 steps
    train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=1, lr=5e-4, weight_decay=0.01,
                                                                   batch_size=32, precision="fp32"))


@register_stage("encoder_distill", EncoderDistillConfig, compresses=True, tasks=EMBEDDING)
def encoder_distill(model, cfg: EncoderDistillConfig, ctx: EncoderContext):
    """Drop layers (keep every k-th), remove heads and FFN neurons, and distil embeddings and hidden
    states from the float model."""
    from torchslim.data import text
    student, kept = drop_layers(model, cfg.keep_every, cfg.keep_layers)
    pruned = prune_encoder(student, cfg.head_ratio, cfg.ffn_ratio) if cfg.head_ratio or cfg.ffn_ratio else None
    distiller = EncoderDistiller(model, student, dict(enumerate(kept)), cfg.embedding_weight, cfg.hidden_weight)
    final = ctx.stage_dir / "distilled.safetensors"
    before = ctx.calibration_fidelity(student)
    if ctx.resume and final.exists():
        load_weights(student, final)
    else:
        data = sentence_dataset(ctx.tokenizer, text.training_corpus(limit=cfg.train_sentences), cfg.max_length)
        result = ctx.fit(student, data, cfg.train, distiller.loss, checkpoint_dir=ctx.stage_dir / "ckpt",
                         description="encoder_distill")
        ctx.stage_info["history"] = result.history
        save_weights(student, final)
    ops = [*ctx.architecture.get("ops", []), {"keep_layers": kept}]
    ops += [{"layer_shapes": layer_shapes(student)}] if pruned else []
    ctx.architecture = {**ctx.architecture, "ops": ops}
    if pruned:
        ctx.stage_info["pruned"] = pruned
    ctx.stage_info["architecture"] = ctx.architecture
    ctx.stage_info["depth"] = {"teacher_layers": _layers(model), "kept": kept, "layer_map": dict(enumerate(kept)),
                               "teacher_params": sum(p.numel() for p in model.parameters()),
                               "student_params": sum(p.numel() for p in student.parameters()),
                               "train_sentences": cfg.train_sentences,
                               "calibration_cosine_before": before,
                               "calibration_cosine_after": ctx.calibration_fidelity(student)}
    return student.eval()


def _layers(model) -> int:
    from torchslim.prune.encoder import encoder_layers
    return len(encoder_layers(model))


class EncoderQuantizeConfig(Strict):
    method: Literal["dynamic", "static"] = Field("dynamic", description="dynamic: int8 weights, activations "
                                                 "quantized at run time (MatMul, Attention, word embeddings); "
                                                 "static: MatMul in QDQ with min-max activation ranges from the "
                                                 "calibration sentences; Attention and word embeddings, "
                                                 "which have no static kernel, dynamic")
    per_channel: bool = True
    target: float = Field(0.995, gt=0, le=1, description="worst source's mean calibration cosine to the float "
                          "model being quantized; the most sensitive nodes stay in float until it is reached")
    fuse: bool = Field(True, description="fuse attention, layer norm and GELU with ONNX Runtime's transformer "
                       "optimizer before quantizing, then apply torchslim's CPU serving rewrites (layer norms out "
                       "of SkipLayerNormalization, a softer attention mask)")
    pad_free: bool = Field(True, description="with fuse: run everything but attention on the real tokens only "
                           "(padded positions gathered out after the embeddings, scattered back around attention)")


@register_stage("encoder_quantize", EncoderQuantizeConfig, compresses=True, tasks=EMBEDDING, lowers=True)
def encoder_quantize(model, cfg: EncoderQuantizeConfig, ctx: EncoderContext):
    """Dynamic int8 (per-channel) of MatMul/Attention nodes with cosine-driven float fallback."""
    first = next(iter(ctx.evaluation.values()))
    float_onnx = export_encoder(model, ctx.tokenizer, ctx.stage_dir / "float.onnx", first, fuse=cfg.fuse,
                                pad_free=cfg.pad_free)
    with torch.inference_mode():
        reference = {k: embed(model, ctx.tokenizer, s) for k, s in ctx.calibration.items()}
    path, info = fidelity_int8(float_onnx, ctx.tokenizer, ctx.calibration, reference, ctx.stage_dir / "model.onnx",
                               cfg.target, ctx.recipe.measure.threads, cfg.per_channel, cfg.method)
    ctx.stage_info["encoder_int8"] = {**info, "float_ops": fusion_counts(float_onnx), "int8_ops": fusion_counts(path)}
    console.log(f"encoder_quantize: ONNX Runtime runs {describe(kernel_counts(path, ctx.recipe.measure.threads))} on this CPU")
    float_onnx.unlink()
    ctx.artifact_onnx = path
    return model
