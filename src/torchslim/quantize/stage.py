"""The `quantize` recipe stage: static int8 PTQ, dynamic int8, weight-only int4/int8, fp16 — each
lowered to an ONNX Runtime artifact — with per-layer sensitivity and accuracy-driven fallback."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal, Optional

import numpy as np
import onnx
from pydantic import AliasChoices, Field, model_validator

from torchslim.config import ByVariant, only
from torchslim.cpu import has_int8_dot_product
from torchslim.errors import TorchslimError
from torchslim.export.decoder import complete_feed
from torchslim.export.gguf import why_not, write_gguf
from torchslim.log import console, warn
from torchslim.measure.kernels import describe, kernel_counts
from torchslim.measure.latency import interleaved, ort_session
from torchslim.paths import matches
from torchslim.quantize import lower
from torchslim.quantize.awq import awq_scale, smooth_scale
from torchslim.quantize.budget import mixed_bits, relative_drop
from torchslim.quantize.fallback import fallback, sensitivity
from torchslim.quantize.nbits import lower_quantized_weights, set_accuracy_level
from torchslim.quantize.qat import prepare_qat
from torchslim.quantize.scheme import choose_scheme, scheme_for
from torchslim.quantize.weights import (
    Grid,
    collect_hessians,
    linear_layers,
    output_head,
    quantize_layer,
    quantize_weights,
    tied_to_input,
)
from torchslim.registry import register_stage
from torchslim.results import Lowered
from torchslim.tasks import onnx_predictor, torch_predictor
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


def _weight_only(model, cfg: QuantizeConfig, ctx, out: Path) -> dict:
    """Linear layers' weights on a `bits`-bit grid with a scale per `group_size` input columns, by
    round-to-nearest or GPTQ (on the task's calibration batches), lowered to MatMulNBits with those
    very integers and scales (a layer whose width the group does not divide ends with a short group).
    A language model's output head gets `head_bits` (and a tied embedding table the same integers,
    stored once: `head_group`).
    Layers in `ignore` stay float."""
    import copy

    grid = Grid(cfg.bits, cfg.group_size, cfg.symmetric, cfg.clip)
    quantized = copy.deepcopy(model).eval().cpu()
    layers = {n: m for n, m in linear_layers(quantized).items() if not matches(n, cfg.ignore)}
    head = output_head(quantized)
    heads = {head[0]: head[1]} if head and cfg.head_bits and not matches(head[0], cfg.ignore) else {}
    layers = {n: m for n, m in layers.items() if n not in heads}
    if not layers and not heads:
        raise TorchslimError(
            "weight_only: no Linear layer to quantize (every one is in `ignore`, or the model has none)."
        )
    hessians, options, folds = None, {}, None
    if cfg.algorithm == "gptq" or cfg.awq or cfg.clip:  # the clipping search weighs columns by their inputs
        batches = list(ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size))
        magnitudes: dict = {}
        hessians = collect_hessians(quantized, batches, {**layers, **heads}, magnitudes)
        if cfg.awq:  # one pass over the calibration data: the Hessians are rescaled with the folds
            folds = awq_scale(quantized, batches, grid, layers, hessians, magnitudes)
    if cfg.algorithm == "gptq":
        options = {"damp": cfg.damp, "act_order": cfg.act_order}
    floats = {n: m.weight.data.clone() for n, m in layers.items()} if cfg.max_relative_drop else {}
    records = []
    if heads:  # first, so the layers' sensitivity is measured with the head as it will be served
        head_grid = Grid(
            cfg.head_bits,
            head_group(cfg.group_size, head[1], tied_to_input(quantized, head[1])),
            cfg.symmetric,
            cfg.clip,
        )
        records += quantize_weights(quantized, head_grid, cfg.algorithm, hessians, heads, **options)
    records = quantize_weights(quantized, grid, cfg.algorithm, hessians, layers, **options) + records
    allocation = None
    if cfg.max_relative_drop:
        allocation = _allocate_bits(quantized, layers, floats, hessians, options, records, cfg, ctx)
    grid_onnx = ctx.task.export(quantized, ctx.stage_dir / "grid.onnx", ctx.exporter)
    lower_quantized_weights(grid_onnx, out, quantized)
    grid_onnx.unlink(missing_ok=True)
    gguf = _gguf(quantized, grid, ctx, out.with_suffix(".gguf"))
    info = {
        "algorithm": cfg.algorithm,
        "bits": cfg.bits,
        "group_size": cfg.group_size,
        "symmetric": cfg.symmetric,
        "clip": cfg.clip,
        "awq": folds,
        "allocation": allocation,
        "gguf": gguf,
        "head": {
            "layer": head[0],
            "bits": cfg.head_bits if heads else None,
            "group_size": head_grid.group if heads else None,
            "tied_embeddings": tied_to_input(quantized, head[1]),
        }
        if head
        else None,
        "compute": _nbits_compute(out, cfg.compute, ctx, cfg.compute_max_drop, cfg.compute_max_share, model),
        "layers": records,
    }
    return {"weight_only": info}


def head_group(group: int, head, tied: bool) -> int:
    """The head's group size: `group`, or for a head tied to the input embeddings whose width `group`
    does not divide, the largest power of two below it (16 at least) that does — whole groups, so the
    embedding lookup reads the head's own integers and the table is stored once."""
    width = head.weight.shape[1]
    if not tied or group <= 0 or width % group == 0:
        return group
    return next((g for g in (group >> i for i in range(1, 8)) if g >= 16 and width % g == 0), group)


def _gguf(model, grid, ctx, out: Path) -> dict:
    """Also a GGUF for llama.cpp with the same integers, where the scheme maps onto a GGUF type and the
    model came from a GGUF file; else why not."""
    source = ctx.task.source_gguf()
    reason = why_not(grid, source)
    if reason is None:
        try:
            info = write_gguf(model, source, out)
        except TorchslimError as exc:
            reason = str(exc)
        else:
            console.log(
                f"quantize: wrote {out.name} for llama.cpp ({info['bytes']:,} bytes; "
                + ", ".join(f"{k} {v}" for k, v in info["types"].items())
                + ")"
            )
            return info
    return {"skipped": reason}


def _allocate_bits(model, layers: dict, floats: dict, hessians, options: dict, records: list[dict], cfg, ctx) -> dict:
    """The most sensitive layers move to `fallback_bits` until the validation metric is within the
    budget (quantize/budget.py); their records are updated."""
    high = Grid(cfg.fallback_bits, cfg.group_size, cfg.symmetric, cfg.clip)
    by_name = {r["layer"]: r for r in records}

    def requantize(name: str) -> None:
        by_name[name].update(
            quantize_layer(
                layers[name],
                high,
                cfg.algorithm,
                None if hessians is None else hessians[name],
                weight=floats[name],
                **options,
            )
        )

    predict = torch_predictor(model, ctx.recipe.measure.threads)
    chosen = mixed_bits(
        layers,
        floats,
        requantize,
        lambda: ctx.task.score(predict),
        lambda: ctx.task.score(predict, cfg.sensitivity_samples),
        cfg.max_relative_drop,
    )
    for name in layers:
        by_name[name]["bits"] = cfg.fallback_bits if name in chosen["high_layers"] else cfg.bits
    return chosen


def _smoothed(model, cfg: QuantizeConfig, ctx):
    """A copy of the model with SmoothQuant's scales folded in (the same float function) and the folds."""
    import copy

    smoothed = copy.deepcopy(model)
    layers = {n: m for n, m in linear_layers(smoothed, skip=()).items() if not matches(n, cfg.ignore)}
    folds = smooth_scale(
        smoothed, ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size), layers, cfg.smooth
    )
    console.log(f"quantize: SmoothQuant (alpha {cfg.smooth}) folded into {len(folds)} layer group(s)")
    return smoothed, {"alpha": cfg.smooth, "folds": folds}


def _nbits_compute(path: Path, choice: str, ctx, max_drop: float = 0.005, max_share: float = 0.0, model=None) -> dict:
    """Set MatMulNBits' accuracy_level in `path`: 0 (float compute) or 4 (int8 compute); `auto` times
    both interleaved on the task's comparison inputs and keeps int8 if it is faster (geometric mean over
    the input shapes of the per-round time ratios) and its validation metric is within `max_drop` of
    float compute's — or within `max_share` of the drop the weights' rounding cost against `model` (the
    PyTorch model before quantization), if larger: quantizing the activations per block adds error that
    depends on the model's activation outliers, so it is measured, not assumed."""
    if choice != "auto":
        set_accuracy_level(path, path, 4 if choice == "int8" else 0)
        return {"chosen": choice}
    int8 = set_accuracy_level(path, path.with_name("int8-compute.onnx"), 4)
    sessions = {
        "float": ort_session(path, ctx.recipe.measure.threads, spinning=False),
        "int8": ort_session(int8, ctx.recipe.measure.threads, spinning=False),
    }
    shapes, logs = {}, []
    for label, feed in ctx.task.comparison_feeds().items():
        calls = {k: (lambda s=s, f=complete_feed(s, feed): s.run(None, f)) for k, s in sessions.items()}
        t = interleaved(calls, rounds=7, warmup=1)
        ratio = np.asarray(t["int8"]["samples_ms"]) / np.asarray(t["float"]["samples_ms"])
        shapes[label] = {
            "float_ms": t["float"]["p50"],
            "int8_ms": t["int8"]["p50"],
            "int8_over_float": float(np.median(ratio)),
        }
        logs.append(float(np.log(ratio).mean()))
    scores = {k: ctx.task.score(onnx_predictor(s)) for k, s in sessions.items()}
    del sessions
    drop = relative_drop(scores["float"], scores["int8"])
    weights_drop = relative_drop(ctx.task.validate(model), scores["float"]) if model is not None and max_share else 0.0
    allowed = max(max_drop, max_share * weights_drop)
    faster = bool(np.mean(logs) < 0)
    chosen = "int8" if faster and drop <= allowed else "float"
    if chosen == "int8":
        os.replace(int8, path)
    else:
        int8.unlink()
    why = (
        ""
        if chosen == "int8" or not faster
        else f"; int8 is faster but loses {drop:.2%} of the validation "
        f"metric, more than the {allowed:.2%} allowed (compute_max_drop, or compute_max_share of the weights' "
        f"{weights_drop:.2%})"
    )
    console.log(
        f"quantize: MatMulNBits computes in {chosen} on this CPU ("
        + ", ".join(f"{k}: float {v['float_ms']:.1f} ms, int8 {v['int8_ms']:.1f} ms" for k, v in shapes.items())
        + f"; validation drop of int8 compute {drop:.2%}{why})"
    )
    return {
        "chosen": chosen,
        "timed": shapes,
        "validation": scores,
        "int8_validation_drop": drop,
        "weights_validation_drop": weights_drop,
        "allowed_drop": allowed,
        "max_drop": max_drop,
    }


def _val_score(ctx, path: Path, samples: int) -> float:
    """The task's validation metric (larger = better) of an ONNX artifact on this CPU."""
    return ctx.task.score(onnx_predictor(ort_session(path, ctx.recipe.measure.threads)), samples)


def calibration_batches(ctx, batches: int, batch_size: int = 64) -> list[dict]:
    """`batches` real training batches for calibration as ONNX Runtime feeds, the same ones for the
    same seed."""
    return [ctx.task.feed(inputs) for inputs in ctx.task.calibration(batches, batch_size)]


def _excluded_nodes(nodes, ignore: list[str]) -> list[str]:
    """Graph nodes left in float: named themselves, or made by a module `ignore` matches."""
    return [name for name, _, module in nodes if name in ignore or (module and matches(module, ignore))]


def _static(float_onnx: Path, out: Path, cfg: QuantizeConfig, ctx, trained: dict | None = None) -> dict:
    """Static int8 in QDQ, in the scheme that suits this CPU, with the sensitivity table and
    accuracy-driven fallback when asked. Activation ranges are calibrated on real batches; after QAT
    (`trained`: its activation ranges and weight scales by layer path) every quantized layer's input
    range and weight scales are the trained ones, so what was trained is what ships."""
    pre = lower.preprocess(float_onnx, ctx.stage_dir / "float.pre.onnx")  # once, for every trial below
    info: dict = {"observer": cfg.observer}
    ranges = lower.activation_ranges(
        pre, calibration_batches(ctx, cfg.calibration_batches, cfg.calibration_batch_size), cfg.observer
    )
    weight_scales = _use_trained(pre, trained, ranges, info) if trained is not None else {}
    nodes = lower.quantizable_nodes(pre)
    common = dict(
        ranges=ranges,
        preprocessed=True,
        per_channel=cfg.per_channel,
        symmetric_activations=cfg.symmetric_activations,
        weight_bits=cfg.weight_bits,
    )
    excluded = _excluded_nodes(nodes, cfg.ignore)
    info["quantizable_layers"] = [m for _, _, m in nodes]
    threads = ctx.recipe.measure.threads
    score = lambda path: _val_score(ctx, path, cfg.sensitivity_samples)  # noqa: E731
    if cfg.activation_type == "auto":

        def build(s, path):
            return lower.static_int8(
                pre,
                path,
                nodes_to_exclude=excluded,
                activation_type=s.activation_type,
                reduce_range=s.reduce_range,
                **common,
            )

        scheme, info["scheme"] = choose_scheme(
            build,
            score,
            float_onnx,
            ctx.task.feed(ctx.example(ctx.recipe.measure.batch_size)),
            threads,
            cfg.scheme_tolerance,
        )
        _log_scheme(info["scheme"])
    else:
        scheme = scheme_for(cfg.activation_type, cfg.reduce_range)
    info.update(activation_type=scheme.activation_type, reduce_range=scheme.reduce_range, scheme_name=scheme.name)
    common.update(activation_type=scheme.activation_type, reduce_range=scheme.reduce_range)
    if cfg.max_accuracy_drop is None and not cfg.sensitivity:
        lower.static_int8(pre, out, nodes_to_exclude=excluded, **common)
        _ship_weight_scales(out, pre, weight_scales, info, scheme.reduce_range)
        return {**info, "float_layers": [m for n, _, m in nodes if n in excluded]}
    base = score(float_onnx)
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "trial.onnx"

        def alone(name: str) -> float:  # validation metric lost when this layer alone is int8
            lower.static_int8(pre, trial, nodes_to_quantize=[name], **common)
            return base - score(trial)

        costs = sensitivity([n for n, _, _ in nodes], alone, "quantize")
    info["sensitivity"] = sorted(
        ({"layer": module, "node": name, "op": op, "drop": costs[name]} for name, op, module in nodes),
        key=lambda r: -r["drop"],
    )
    budget = cfg.max_accuracy_drop
    excluded, value = fallback(
        [r["node"] for r in info["sensitivity"]],
        lambda ex: lower.static_int8(pre, out, nodes_to_exclude=ex, **common),
        score,
        lambda v: budget is None or base - v <= budget,
        excluded,
    )
    drop = base - value
    console.log(
        f"quantize: {len(nodes) - len(excluded)}/{len(nodes)} layers quantized in the graph, validation drop {drop:.4f}"
    )
    _ship_weight_scales(out, pre, weight_scales, info, scheme.reduce_range)
    met = cfg.max_accuracy_drop is None or drop <= cfg.max_accuracy_drop
    info.update(
        val_float_accuracy=base,
        val_drop=drop,
        budget=cfg.max_accuracy_drop,
        float_layers=[m for n, _, m in nodes if n in excluded],
        budget_met=met,
    )
    if not met:
        warn(
            f"quantize: the accuracy budget is NOT met: validation drop {100 * drop:.2f} pt with every layer "
            f"back in float exceeds max_accuracy_drop {100 * cfg.max_accuracy_drop:.2f} pt (the rest is "
            "activation quantization of the graph's inputs and outputs); raise the budget, calibrate with "
            "another observer, or use method: qat."
        )
    return info


def _use_trained(pre: Path, trained: dict, ranges: dict, info: dict) -> dict:
    """QAT's trained input ranges put into `ranges` (and upstream through shared-scale ops); returns
    the trained weight scales by graph node."""
    where = lower.layer_tensors(pre, trained["activation_ranges"])
    for layer, (node, tensor) in where.items():
        for name in lower.upstream_of(pre, tensor):
            ranges[name] = tuple(trained["activation_ranges"][layer])
    info["trained_ranges"] = {
        layer: {"node": node, "tensor": tensor, "range": ranges[tensor]} for layer, (node, tensor) in where.items()
    }
    return {where[layer][0]: s for layer, s in trained["weight_scales"].items() if layer in where}


def _ship_weight_scales(path: Path, float_graph: Path, scales: dict, info: dict, reduce_range: bool) -> None:
    """QAT: put the trained per-channel weight scales into the artifact (atomically)."""
    if not scales:
        return
    model = onnx.load(str(path))
    changed = lower.set_weight_scales(model, scales, lower.float_weights(float_graph), 63 if reduce_range else 127)
    tmp = path.with_name(path.name + ".tmp")
    onnx.save(model, str(tmp))
    os.replace(tmp, path)
    info["trained_weight_scales"] = changed
    kept = sorted(set(scales) - set(changed))
    if kept:
        console.log(
            f"quantize: {len(kept)} layer(s) keep the quantizer's weight scales (their weights left the "
            "trained grid when batch norm was folded into them on export, or the grid needs more levels "
            f"than the scheme's weights have): {', '.join(kept)}"
        )


def _log_scheme(record: dict) -> None:
    for r in record["candidates"]:
        console.log(
            f"quantize: scheme {r['name']}: {r['integer_nodes']} integer / {r['float_nodes']} float "
            f"compute nodes in ONNX Runtime's graph, {r['latency_ms']:.2f} ms "
            f"({r['speedup_vs_float']:.2f}x float), validation accuracy {r['val_accuracy']:.4f}"
        )
    chosen = next(r for r in record["candidates"] if r["name"] == record["chosen"])
    console.log(
        f"quantize: chose {record['chosen']} (fastest within {100 * record['tolerance']:.2f} pt of the most "
        "accurate scheme on this CPU)"
    )
    if chosen["speedup_vs_float"] < 1:
        warn(
            f"quantize: on this CPU every int8 scheme is slower than float for this model at batch "
            f"{record['batch_size']} ({chosen['latency_ms']:.2f} vs {record['float_latency_ms']:.2f} ms); "
            "consider method: dynamic or weight_only, or no quantization."
        )


def _qat(model, cfg: QuantizeConfig, ctx) -> dict:
    """Train with fake quantization through the one training loop, then bake the quantized weights."""
    handle = prepare_qat(
        model, cfg.weight_bits, cfg.activation_bits, cfg.per_channel, cfg.learnable_scales, tuple(cfg.ignore)
    )

    def setup(m, epoch: int) -> None:  # epoch counts from 0; the options count finished epochs
        if cfg.freeze_observers_epoch is not None and epoch >= cfg.freeze_observers_epoch:
            handle.freeze_observers()
        if cfg.freeze_bn_epoch is not None and epoch >= cfg.freeze_bn_epoch:
            handle.freeze_batch_norm()

    tune = cfg.finetune
    result = ctx.fit(model, tune, checkpoint_dir=ctx.stage_dir / "checkpoint", description="qat", epoch_setup=setup)
    model.cpu()
    ranges = handle.finish()
    return {
        "layers": handle.layers,
        "activation_ranges": ranges,
        "weight_scales": handle.weight_scales,
        "best_val_metric": result.best_metric,
        "history": result.history,
    }


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
        info["qat"] = _qat(model, cfg, ctx)
        trained["history"] = info["qat"].pop("history")
    out = ctx.stage_dir / "model.onnx"
    if cfg.method == "weight_only":
        info.update(_weight_only(model, cfg, ctx, out))
        counts = kernel_counts(out, ctx.recipe.measure.threads)
        console.log(f"quantize: ONNX Runtime runs {describe(counts)} on this CPU")
        return Lowered(model, {"quantization": info}, artifact=out)
    source = model.eval().cpu()
    if cfg.smooth is not None and cfg.method in ("static", "dynamic"):
        source, info["smooth"] = _smoothed(source, cfg, ctx)
    float_onnx = ctx.task.export(source, ctx.stage_dir / "float.onnx", ctx.exporter)
    if cfg.method in ("static", "qat"):
        info.update(_static(float_onnx, out, cfg, ctx, info.get("qat")))
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
