"""Weight-only int4/int8 (MatMulNBits): round-to-nearest or GPTQ on a grouped grid, AWQ's
activation-aware scales, the output head's bits, bits allocated to a validation budget, MatMulNBits'
compute chosen on this CPU, and a GGUF for llama.cpp with the same integers.

The grid and the algorithms are in quantize/weights.py (RTN, GPTQ, clipping), quantize/awq.py (AWQ),
quantize/budget.py (mixed bits) and quantize/nbits.py (lowering); this module wires them into the
quantize stage (`lower_model`)."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import numpy as np
import torch

from torchslim.errors import TorchslimError
from torchslim.export import ggml
from torchslim.export.decoder import complete_feed
from torchslim.export.gguf import mixture_types, why_not, write_gguf
from torchslim.log import console
from torchslim.measure.latency import interleaved, ort_session
from torchslim.paths import matches
from torchslim.quantize.awq import awq_scale
from torchslim.quantize.budget import mixed_bits, relative_drop
from torchslim.quantize.nbits import lower_quantized_weights, set_accuracy_level
from torchslim.quantize.weights import (
    Grid,
    collect_hessians,
    gptq,
    linear_layers,
    output_error,
    output_head,
    quantize_layer,
    quantize_weights,
    tied_to_input,
)
from torchslim.tasks import onnx_predictor, torch_predictor


def lower_model(model, cfg, ctx, out: Path) -> dict:
    """Linear layers' weights on a `bits`-bit grid with a scale per `group_size` input columns, by
    round-to-nearest or GPTQ (on the task's calibration batches), lowered to MatMulNBits with those
    very integers and scales (a layer whose width the group does not divide ends with a short group).
    A language model's output head gets `head_bits` (and a tied embedding table the same integers,
    stored once: `head_group`).
    Layers in `ignore` stay float. `cfg` is the quantize stage's QuantizeConfig; returns its
    `weight_only` record."""
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
    # the float weights (AWQ's scaling folded) for a GGUF in llama.cpp's mixture, where one can be written
    mixture_model = copy.deepcopy(quantized) if cfg.gguf and ctx.task.gguf_source() is not None else None
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
    if cfg.gguf:
        gguf = _gguf_mixture(mixture_model, cfg, ctx, hessians, out.with_suffix(".gguf"))
        mixture_model = None
    else:
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
    writer has the metadata (the model's GGUF file or Hugging Face folder); else why not."""
    source = ctx.task.gguf_source()
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


def _gguf_mixture(model, cfg, ctx, hessians: dict | None, out: Path) -> dict:
    """A GGUF in llama.cpp's mixture `cfg.gguf`, rounded by `round_into_mixture`; `model` (the float
    model, AWQ's scaling folded) ends with the weights llama.cpp computes with, and its validation
    metric is measured on them."""
    source = ctx.task.gguf_source()
    if model is None or source is None:
        return {"skipped": why_not(None, None)}
    try:
        packed, records = round_into_mixture(
            model, source, cfg.gguf, hessians, cfg.algorithm, damp=cfg.damp, ignore=cfg.ignore
        )
    except TorchslimError as exc:
        return {"skipped": str(exc)}
    info = write_gguf(model, source, out, mixture=cfg.gguf, packed=packed)
    info.update(
        mixture=cfg.gguf,
        algorithm=cfg.algorithm,
        bits_per_weight=info["tensor_bytes"] * 8 / sum(p.numel() for p in getattr(model, "lm", model).parameters()),
        validation=ctx.task.score(torch_predictor(model, ctx.recipe.measure.threads)),
        tensors=records,
    )
    console.log(
        f"quantize: wrote {out.name} for llama.cpp in {cfg.gguf} ({info['bytes']:,} bytes, "
        f"{info['bits_per_weight']:.2f} bits per weight; "
        + ", ".join(f"{k} {v}" for k, v in info["types"].items())
        + f"; validation metric of its weights {info['validation']:.4f})"
    )
    return info


def round_into_mixture(
    model,
    source: Path,
    mixture: str,
    hessians: dict | None = None,
    algorithm: str = "rtn",
    damp: float = 0.01,
    ignore=(),
) -> tuple[dict, list[dict]]:
    """Every weight matrix of `model` (a causal LM or a wrapper holding one as `.lm`) in the GGUF type
    `llama-quantize` gives it in `mixture` (`export.gguf.llama_type`): the type's grid searched with
    each input column weighted by the diagonal of its layer's input Hessian (`hessians`, keyed by
    `linear_layers(model, skip=())` names: the calibration inputs' mean square, llama.cpp's importance
    matrix), the codes chosen by GPTQ on that grid (`algorithm="gptq"`, where a Hessian is given) or
    rounded to nearest; tensors in `ignore` (module paths or globs) stay float16. The weights are
    replaced, in place, by those llama.cpp computes with. Returns ({Hugging Face parameter name: (type,
    blocks)} for `write_gguf(packed=...)`, one record per tensor: type and output error, with GPTQ also
    round-to-nearest's on the same grid)."""
    lm = getattr(model, "lm", model)
    types = mixture_types(lm, source, mixture)
    params = dict(lm.named_parameters(remove_duplicate=False))
    modules = {id(m.weight): n for n, m in linear_layers(model, skip=()).items()}
    packed, records = {}, []
    for hf, kind in types.items():
        weight = params[hf]
        name = modules.get(id(weight))
        if kind == "F16" or (name is not None and matches(name, ignore)):
            packed[hf] = ("F16", weight.detach().float())
            records.append({"tensor": hf, "type": "F16"})
            continue
        hessian = None if hessians is None or name is None else hessians.get(name)
        w = weight.detach().float()
        g = ggml.grid(w, kind, None if hessian is None else torch.diag(hessian))
        if algorithm == "gptq" and hessian is not None:
            q = gptq(w, hessian, g, damp=damp, fixed=(g.step, g.offset))[0]
        else:
            q = ggml.codes(w, g)
        packed[hf] = (kind, ggml.encode(g, q))
        new = ggml.decode(g, q)
        record = {"tensor": hf, "type": kind}
        if hessian is not None:
            record["output_error"] = output_error(w, new, hessian)
            if algorithm == "gptq":  # what rounding to nearest on the same grid would have cost
                record["rtn_output_error"] = output_error(w, ggml.decode(g, ggml.codes(w, g)), hessian)
        records.append(record)
        weight.data = new.to(weight.dtype)
    return packed, records


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
