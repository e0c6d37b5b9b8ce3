"""The `quantize` recipe stage: its config and the dispatch by method — static int8 PTQ, QAT, dynamic
int8, weight-only int4/int8, fp16 — each lowered to an ONNX Runtime artifact.

The methods live beside it: quantize/static.py (static int8 and QAT's lowering: calibration, the
scheme chosen on this CPU, per-node sensitivity, accuracy-driven fallback, trained ranges),
quantize/weight_only.py (int4/n-bit weights, bit allocation, AWQ, MatMulNBits compute, GGUF) and
quantize/qat.py (the QAT training run); SmoothQuant for static and dynamic is folded in here."""

from __future__ import annotations

import copy
from typing import Literal, Optional

from pydantic import AliasChoices, Field, model_validator

from torchslim.config import ByVariant, only
from torchslim.cpu import has_int8_dot_product
from torchslim.errors import TorchslimError
from torchslim.export.gguf import MIXTURES
from torchslim.log import console, warn
from torchslim.measure.kernels import describe, kernel_counts
from torchslim.paths import matches
from torchslim.quantize import lower, static, weight_only
from torchslim.quantize.awq import smooth_scale
from torchslim.quantize.qat import train_qat
from torchslim.quantize.weights import linear_layers
from torchslim.registry import register_stage
from torchslim.results import Lowered
from torchslim.train import TrainConfig

INT8, STATIC, QAT = only("static", "qat", "dynamic"), only("static", "qat"), only("qat")
CALIBRATED, WEIGHTS = only("static", "qat", "dynamic", "weight_only"), only("weight_only")
SENSITIVE = only("static", "weight_only")


class QuantizeConfig(ByVariant):
    method: Literal["static", "qat", "dynamic", "weight_only", "fp16"] = Field(
        "static",
        description="static: int8 weights and activations calibrated on real batches; qat: trained with "
        "fake quantization; dynamic: activations quantized per call; weight_only: int4/int8 weights (MatMulNBits); "
        "fp16: half-precision weights",
    )
    observer: Literal["minmax", "moving_average", "percentile", "mse", "entropy"] = Field(
        "minmax", json_schema_extra=STATIC
    )
    calibration_batches: int = Field(
        8,
        ge=1,
        le=10000,
        description="real training batches for calibration "
        "(static, qat; weight_only with GPTQ, AWQ or the clipping search; dynamic "
        "with smooth)",
        json_schema_extra=CALIBRATED,
    )
    calibration_batch_size: int = Field(64, ge=1, le=4096, json_schema_extra=CALIBRATED)
    per_channel: bool = Field(True, json_schema_extra=INT8)
    smooth: Optional[float] = Field(
        None,
        ge=0,
        le=1,
        description="static, dynamic: SmoothQuant's alpha — each "
        "input channel's activation outliers moved into the weights (s = max|x|^alpha"
        " / max|w|^(1-alpha)), folded into the norm or Linear that produces the channel "
        "(checked to leave the float model unchanged); null: off",
        json_schema_extra=only("static", "dynamic"),
    )
    symmetric_activations: bool = Field(False, json_schema_extra=STATIC)
    activation_type: Literal["auto", "int8", "uint8"] = Field(
        "auto",
        description="auto: build S8S8, U8S8 with reduce_range and U8S8, count which nodes ONNX Runtime "
        "runs on integer kernels on this CPU, time them side by side, keep the fastest within scheme_tolerance "
        "of the most accurate; int8 (S8S8) or uint8 (U8S8) force a scheme",
        json_schema_extra=STATIC,
    )
    reduce_range: bool = Field(
        False,
        description="with an explicit activation_type: 7-bit weights (AVX2 CPUs "
        "without VNNI, against int16 saturation of the u8*s8 multiply-add)",
        json_schema_extra=STATIC,
    )
    scheme_tolerance: float = Field(
        0.002,
        ge=0,
        lt=1,
        description="auto: validation metric a faster scheme may lose against the most accurate one",
        json_schema_extra=STATIC,
    )
    weight_bits: int = Field(
        8, ge=2, le=8, description="static: weights clipped to this many bits (int8 kernels)", json_schema_extra=STATIC
    )
    bits: Literal[4, 8] = Field(4, description="weight_only: bits per weight", json_schema_extra=WEIGHTS)
    group_size: int = Field(
        32, ge=16, description="weight_only: weights sharing one scale (power of two)", json_schema_extra=WEIGHTS
    )
    algorithm: Literal["rtn", "gptq"] = Field(
        "rtn",
        description="weight_only: round-to-nearest, or GPTQ (each "
        "column's rounding error spread over the columns not yet quantized, "
        "by the inverse Hessian of the layer's calibration inputs)",
        json_schema_extra=WEIGHTS,
    )
    symmetric: bool = Field(
        True,
        description="weight_only: a signed grid without zero points; false: unsigned with a zero point per group",
        json_schema_extra=WEIGHTS,
    )
    act_order: bool = Field(
        False,
        description="weight_only gptq: columns in order of decreasing Hessian diagonal",
        json_schema_extra=WEIGHTS,
    )
    damp: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="weight_only gptq: share of the mean Hessian diagonal added",
        json_schema_extra=WEIGHTS,
    )
    clip: int = Field(
        10,
        ge=0,
        le=100,
        description="weight_only: each group's range shrunk by the best of this "
        "many factors from 1 to 0.5 (least rounding error, columns weighted by their inputs' mean "
        "square when calibration runs); 0: the full range",
        json_schema_extra=WEIGHTS,
    )
    awq: bool = Field(
        False,
        description="weight_only: activation-aware scaling before rounding (AWQ): input "
        "channels with large calibration activations scaled up in the weights and down where they "
        "are produced (a norm or Linear, found by tracing and checked to leave the float model "
        "unchanged), the exponent per layer group by least output error",
        json_schema_extra=WEIGHTS,
    )
    head_bits: Optional[Literal[4, 8]] = Field(
        8,
        description="weight_only: bits of a language model's output head "
        "(with the same group size; a head tied to the input embeddings "
        "takes the table with it: GatherBlockQuantized); null keeps it float",
        json_schema_extra=WEIGHTS,
    )
    max_relative_drop: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="weight_only: a budget: the validation metric may lose at most this share "
        "of the float model's (a language model: validation perplexity may rise by this share); each layer's "
        "loss alone at `bits` is measured and the most sensitive move to `fallback_bits` until it holds",
        json_schema_extra=WEIGHTS,
    )
    fallback_bits: Literal[4, 8] = Field(
        8,
        description="weight_only with max_relative_drop: bits of the layers that keep more",
        json_schema_extra=WEIGHTS,
    )
    gguf: Optional[Literal[MIXTURES]] = Field(
        None,
        description="weight_only: also write model.gguf for llama.cpp (metadata from the model's GGUF file or "
        "Hugging Face folder) in "
        "this mixture of its types, each weight matrix in the type llama-quantize gives it (Q4_K_M: Q6_K for "
        "the head and some value/down projections, Q4_K elsewhere, Q5_0/Q8_0 for rows not a multiple of 256), "
        "rounded by this stage: the grid searched with columns weighted by the calibration inputs, the codes "
        "by GPTQ (algorithm gptq) or to nearest, after AWQ's scaling (awq); its validation metric is measured "
        "on those weights. null: a GGUF only where bits/group_size/symmetric map onto Q4_0, Q4_1 or Q8_0",
        json_schema_extra=WEIGHTS,
    )
    compute: Literal["auto", "float", "int8"] = Field(
        "auto",
        description="weight_only: MatMulNBits computes in float (weights unpacked to float) or in int8 "
        "(activations quantized per block on the fly, accuracy_level 4); auto times both side by side on this "
        "CPU on the task's comparison inputs and keeps int8 if it is faster and within compute_max_drop",
        json_schema_extra=WEIGHTS,
    )
    compute_max_drop: float = Field(
        0.005,
        ge=0,
        lt=1,
        description="weight_only, compute auto: the share of "
        "the validation metric int8 compute may lose against float compute (its "
        "activation rounding comes on top of the weights'); beyond it float compute "
        "is kept however fast int8 is",
        json_schema_extra=WEIGHTS,
    )
    compute_max_share: float = Field(
        0.1,
        ge=0,
        lt=1,
        description="weight_only, compute auto: int8 compute may "
        "also lose this share of what rounding the weights already cost (float "
        "compute against the model before the stage), if that is more than "
        "compute_max_drop: where int4 weights cost 10%, 1% more for int8 compute's "
        "speed is in proportion",
        json_schema_extra=WEIGHTS,
    )
    ignore: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("ignore", "exclude"),
        description="module paths (or globs) or ONNX node names kept in float ('exclude' is accepted too)",
    )
    max_accuracy_drop: Optional[float] = Field(
        None,
        gt=0,
        lt=1,
        description="keep the most sensitive layers in float until the validation metric's drop is within this",
        json_schema_extra=STATIC,
    )
    sensitivity: bool = Field(
        False, description="measure per-layer sensitivity even without a budget", json_schema_extra=STATIC
    )
    sensitivity_samples: int = Field(
        2000,
        ge=1,
        description="validation examples for sensitivity, fallback and "
        "the scheme choice (a language model: windows of validation text; "
        "weight_only measures each layer's sensitivity on this many)",
        json_schema_extra=SENSITIVE,
    )
    finetune: Optional[TrainConfig] = Field(
        None, description="qat: the training run with fake quantization", json_schema_extra=QAT
    )
    activation_bits: int = Field(
        8, ge=2, le=8, description="qat: activations fake-quantized to this many bits", json_schema_extra=QAT
    )
    learnable_scales: bool = Field(False, description="qat: learn the weight scales (LSQ)", json_schema_extra=QAT)
    freeze_observers_epoch: Optional[int] = Field(
        None, ge=1, description="qat: stop updating ranges after it", json_schema_extra=QAT
    )
    freeze_bn_epoch: Optional[int] = Field(
        None, ge=1, description="qat: stop updating batch-norm statistics after it", json_schema_extra=QAT
    )

    @model_validator(mode="after")
    def _checks(self):
        if self.group_size & (self.group_size - 1):
            raise ValueError(f"group_size must be a power of two, got {self.group_size}")
        if self.max_relative_drop is not None and self.method != "weight_only":
            raise ValueError("max_relative_drop works with method 'weight_only' (static and qat: max_accuracy_drop)")
        if self.max_accuracy_drop is not None and self.method not in ("static", "qat"):
            raise ValueError("max_accuracy_drop works with methods 'static' and 'qat'")
        if self.method == "qat" and self.finetune is None:
            raise ValueError("method 'qat' needs 'finetune' (the training settings, e.g. {epochs: 2, lr: 0.0005})")
        return self


def _smoothed(model, cfg: QuantizeConfig, ctx):
    """A copy of the model with SmoothQuant's scales folded in (the same float function) and the folds."""
    smoothed = copy.deepcopy(model)
    layers = {n: m for n, m in linear_layers(smoothed, skip=()).items() if not matches(n, cfg.ignore)}
    folds = smooth_scale(
        smoothed, ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size), layers, cfg.smooth
    )
    console.log(f"quantize: SmoothQuant (alpha {cfg.smooth}) folded into {len(folds)} layer group(s)")
    return smoothed, {"alpha": cfg.smooth, "folds": folds}


@register_stage("quantize", QuantizeConfig, compresses=True, lowers=True)
def quantize(model, cfg: QuantizeConfig, ctx):
    """Quantize the current model and lower it to an ONNX Runtime artifact on int8 (or fp16) kernels."""
    if ctx.recipe.measure.runtime != "onnxruntime":
        raise TorchslimError("the quantize stage delivers an ONNX Runtime artifact; set measure.runtime: onnxruntime.")
    if ctx.artifact is not None:
        raise TorchslimError("the model is already quantized by an earlier stage; quantize once, last.")
    info: dict = {"method": cfg.method}
    trained: dict = {}  # QAT's training history, beside the quantization record as every training stage's
    if cfg.method == "qat":
        info["qat"] = train_qat(model, cfg, ctx)
        trained["history"] = info["qat"].pop("history")
    out = ctx.stage_dir / "model.onnx"
    if cfg.method == "weight_only":
        info.update(weight_only.lower_model(model, cfg, ctx, out))
        counts = kernel_counts(out, ctx.recipe.measure.threads)
        console.log(f"quantize: ONNX Runtime runs {describe(counts)} on this CPU")
        return Lowered(model, {"quantization": info}, artifact=out)
    source = model.eval().cpu()
    if cfg.smooth is not None and cfg.method in ("static", "dynamic"):
        source, info["smooth"] = _smoothed(source, cfg, ctx)
    float_onnx = ctx.task.export(source, ctx.stage_dir / "float.onnx", ctx.exporter)
    if cfg.method in ("static", "qat"):
        info.update(static.lower_graph(float_onnx, out, cfg, ctx, info.get("qat")))
        if "qat" in info:  # the report keeps the trained ranges under "trained_ranges", not twice
            info["qat"] = {k: v for k, v in info["qat"].items() if k not in ("activation_ranges", "weight_scales")}
    elif cfg.method == "dynamic":
        # without VNNI the u8 x s8 kernel saturates on full-range int8 weights: bench/llm.py on SmolLM2-135M
        # (AVX2 EPYC) measured perplexity in the millions with them, 48 with 7-bit weights (float: 29)
        info["reduce_range"] = not has_int8_dot_product()
        lower.dynamic_int8(float_onnx, out, cfg.per_channel, reduce_range=info["reduce_range"])
    else:
        lower.half(float_onnx, out)
    if info.get("float_layers"):
        console.log(f"quantize: kept in float by choice: {', '.join(info['float_layers'])}")
    counts = kernel_counts(out, ctx.recipe.measure.threads)
    console.log(f"quantize: ONNX Runtime runs {describe(counts)} on this CPU")
    if cfg.method in ("static", "qat", "dynamic") and counts["float"] > len(info.get("float_layers", [])):
        warn(
            f"quantize: ONNX Runtime runs {counts['float']} compute node(s) in float on this CPU although the "
            f"graph asks for int8 where it can ({', '.join(counts['float_nodes'][:8])}); they are not counted as "
            "int8 anywhere in the report."
        )
    return Lowered(model, {"quantization": info, **trained}, artifact=out)
