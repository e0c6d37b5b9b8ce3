"""Static int8 in ONNX Runtime: calibration, the activation scheme chosen on this CPU, per-node
sensitivity, accuracy-driven fallback, and QAT's trained ranges and scales.

The steps are public so the quantize stage (`lower_graph`) and the planner (auto/planner.py) run the
same code:

1. `prepare`: the float graph preprocessed once, its activation ranges calibrated on real batches,
   its quantizable nodes listed (a `Calibrated`);
2. `choose_activation_scheme`: S8S8, U8S8 with reduce_range and U8S8 built and measured on this CPU
   (quantize/scheme.py);
3. `quantize`: the QDQ graph from the calibrated ranges, with nodes excluded (or only some quantized);
4. `layer_sensitivity`: the validation metric lost by quantizing each node alone (quantize/fallback.py).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx

from torchslim.io import replacing
from torchslim.log import console, warn
from torchslim.measure.latency import ort_session
from torchslim.paths import matches
from torchslim.quantize import lower
from torchslim.quantize.fallback import fallback, sensitivity
from torchslim.quantize.scheme import Scheme, choose_scheme, scheme_for
from torchslim.tasks import onnx_predictor

S8S8 = scheme_for("int8", False)  # lower.static_int8's default, the recommended CPU setting


@dataclass(frozen=True)
class Calibrated:
    """A float graph ready for static int8, quantized as many times as needed from one calibration."""

    float_onnx: Path  # the exported float graph (what a scheme's latency is compared with)
    graph: Path  # the same graph preprocessed once (ONNX Runtime's quant_pre_process)
    ranges: dict[str, tuple[float, float]]  # observed range of every float tensor
    nodes: list[tuple[str, str, str]]  # (node name, op type, module path) static int8 may lower


@dataclass(frozen=True)
class Settings:
    """How the weights and activations are quantized (lower.static_int8's defaults)."""

    per_channel: bool = True
    symmetric_activations: bool = False
    weight_bits: int = 8


def calibration_batches(ctx, batches: int, batch_size: int = 64) -> list[dict]:
    """`batches` real training batches for calibration as ONNX Runtime feeds, the same ones for the
    same seed."""
    return [ctx.task.feed(inputs) for inputs in ctx.task.calibration(batches, batch_size)]


def val_score(ctx, path: Path, samples: int) -> float:
    """The task's validation metric (larger = better) of an ONNX artifact on this CPU."""
    return ctx.task.score(onnx_predictor(ort_session(path, ctx.recipe.measure.threads)), samples)


def prepare(float_onnx: Path, preprocessed: Path, calibration: Iterable, observer: str = "minmax") -> Calibrated:
    """Preprocess `float_onnx` into `preprocessed` (once, for every graph built from it), observe its
    activation ranges on the `calibration` feeds (arrays for the first input, or dicts of arrays by
    input name) with `observer`, and list the nodes static int8 may quantize."""
    graph = lower.preprocess(float_onnx, preprocessed)
    ranges = lower.activation_ranges(graph, calibration, observer)
    return Calibrated(float_onnx, graph, ranges, lower.quantizable_nodes(graph))


def excluded_nodes(nodes: Sequence[tuple[str, str, str]], ignore: Sequence[str]) -> list[str]:
    """Graph nodes left in float: named in `ignore` themselves, or made by a module `ignore` matches."""
    return [name for name, _, module in nodes if name in ignore or (module and matches(module, ignore))]


def quantize(
    cal: Calibrated,
    out: Path,
    scheme: Scheme = S8S8,
    settings: Settings = Settings(),
    exclude: Sequence[str] = (),
    only: Sequence[str] | None = None,
) -> Path:
    """Write the static int8 QDQ graph of `cal` to `out` (atomically) in the activation `scheme`, from
    the calibrated ranges: every quantizable node but those in `exclude`, or only the nodes in `only`.
    Returns `out`."""
    return lower.static_int8(
        cal.graph,
        out,
        ranges=cal.ranges,
        preprocessed=True,
        per_channel=settings.per_channel,
        symmetric_activations=settings.symmetric_activations,
        weight_bits=settings.weight_bits,
        activation_type=scheme.activation_type,
        reduce_range=scheme.reduce_range,
        nodes_to_exclude=exclude,
        nodes_to_quantize=only,
    )


def choose_activation_scheme(
    cal: Calibrated,
    score: Callable[[Path], float],
    batch: np.ndarray | dict,
    threads: int,
    tolerance: float,
    settings: Settings = Settings(),
    exclude: Sequence[str] = (),
) -> tuple[Scheme, dict]:
    """Build `cal` in every activation scheme (nodes in `exclude` left in float), count the nodes ONNX
    Runtime runs on integer kernels on this CPU, time them interleaved with the float graph on `batch`
    with `threads`, and keep the fastest of those covering the most nodes whose `score(path)` is within
    `tolerance` of the best (quantize/scheme.py). Returns the scheme and the record of every candidate."""
    return choose_scheme(
        lambda s, path: quantize(cal, path, s, settings, exclude),
        score,
        cal.float_onnx,
        batch,
        threads,
        tolerance,
    )


def layer_sensitivity(
    cal: Calibrated,
    score: Callable[[Path], float],
    base: float,
    scheme: Scheme = S8S8,
    settings: Settings = Settings(),
    what: str = "quantize",
    allows: Callable[[str], bool] = lambda node: True,
) -> list[dict]:
    """Each quantizable node quantized alone: `base` (the float graph's score) minus `score(path)` of
    that graph. `allows(node)` may stop early (a time budget), leaving the rest unmeasured. Returns a row
    {layer, node, op, drop} per measured node, costliest first."""
    with tempfile.TemporaryDirectory() as tmp:
        trial = Path(tmp) / "trial.onnx"

        def alone(name: str) -> float:  # validation metric lost when this node alone is int8
            return base - score(quantize(cal, trial, scheme, settings, only=[name]))

        costs = sensitivity([n for n, _, _ in cal.nodes], alone, what, allows)
    return sorted(
        (
            {"layer": module, "node": name, "op": op, "drop": costs[name]}
            for name, op, module in cal.nodes
            if name in costs
        ),
        key=lambda r: -r["drop"],
    )


# ------------------------------------------------------------------------------ the quantize stage


def lower_graph(float_onnx: Path, out: Path, cfg, ctx, trained: dict | None = None) -> dict:
    """The quantize stage's static int8 (`cfg`: its QuantizeConfig): QDQ in the scheme that suits this
    CPU, with the sensitivity table and accuracy-driven fallback when asked. Activation ranges are
    calibrated on real batches; after QAT (`trained`: its activation ranges and weight scales by layer
    path) every quantized layer's input range and weight scales are the trained ones, so what was
    trained is what ships. Returns the stage's quantization record."""
    info: dict = {"observer": cfg.observer}
    cal = prepare(  # preprocessed once, for every trial below
        float_onnx,
        ctx.stage_dir / "float.pre.onnx",
        calibration_batches(ctx, cfg.calibration_batches, cfg.calibration_batch_size),
        cfg.observer,
    )
    weight_scales = _use_trained(cal, trained, info) if trained is not None else {}
    settings = Settings(cfg.per_channel, cfg.symmetric_activations, cfg.weight_bits)
    excluded = excluded_nodes(cal.nodes, cfg.ignore)
    info["quantizable_layers"] = [m for _, _, m in cal.nodes]
    score = lambda path: val_score(ctx, path, cfg.sensitivity_samples)  # noqa: E731
    if cfg.activation_type == "auto":
        scheme, info["scheme"] = choose_activation_scheme(
            cal,
            score,
            ctx.task.feed(ctx.example(ctx.recipe.measure.batch_size)),
            ctx.recipe.measure.threads,
            cfg.scheme_tolerance,
            settings,
            excluded,
        )
        _log_scheme(info["scheme"])
    else:
        scheme = scheme_for(cfg.activation_type, cfg.reduce_range)
    info.update(activation_type=scheme.activation_type, reduce_range=scheme.reduce_range, scheme_name=scheme.name)
    if cfg.max_accuracy_drop is None and not cfg.sensitivity:
        quantize(cal, out, scheme, settings, excluded)
        _ship_weight_scales(out, cal.graph, weight_scales, info, scheme.reduce_range)
        return {**info, "float_layers": [m for n, _, m in cal.nodes if n in excluded]}
    base = score(float_onnx)
    info["sensitivity"] = layer_sensitivity(cal, score, base, scheme, settings)
    order = [r["node"] for r in info["sensitivity"]]  # costliest first
    excluded, drop = _fall_back(cal, out, scheme, settings, order, excluded, score, base, cfg.max_accuracy_drop)
    _ship_weight_scales(out, cal.graph, weight_scales, info, scheme.reduce_range)
    met = cfg.max_accuracy_drop is None or drop <= cfg.max_accuracy_drop
    info.update(
        val_float_accuracy=base,
        val_drop=drop,
        budget=cfg.max_accuracy_drop,
        float_layers=[m for n, _, m in cal.nodes if n in excluded],
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


def _fall_back(
    cal: Calibrated,
    out: Path,
    scheme: Scheme,
    settings: Settings,
    order: list[str],
    excluded: list[str],
    score: Callable[[Path], float],
    base: float,
    budget: float | None,
) -> tuple[list[str], float]:
    """`out` quantized with `excluded` and then the next nodes of `order` (costliest first) back in float
    until the validation drop against `base` is within `budget`. Returns the nodes in float and the drop."""
    excluded, value = fallback(
        order,
        lambda ex: quantize(cal, out, scheme, settings, ex),
        score,
        lambda v: budget is None or base - v <= budget,
        excluded,
    )
    drop = base - value
    console.log(
        f"quantize: {len(cal.nodes) - len(excluded)}/{len(cal.nodes)} layers quantized in the graph, "
        f"validation drop {drop:.4f}"
    )
    return excluded, drop


def _use_trained(cal: Calibrated, trained: dict, info: dict) -> dict:
    """QAT's trained input ranges put into `cal.ranges` (and upstream through shared-scale ops); returns
    the trained weight scales by graph node."""
    ranges = cal.ranges
    where = lower.layer_tensors(cal.graph, trained["activation_ranges"])
    for layer, (node, tensor) in where.items():
        for name in lower.upstream_of(cal.graph, tensor):
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
    with replacing(path) as tmp:
        onnx.save(model, str(tmp))
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
