"""`torchslim analyze`: what a model costs, overall and layer by layer."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from torchslim.context import RunContext
from torchslim.measure import measure
from torchslim.tasks import make_task


def layer_table(model: nn.Module, example: torch.Tensor | tuple) -> list[dict]:
    """One row per leaf module: type, parameters, non-zero parameters, output shape, FLOPs."""
    shapes: dict[str, list] = {}
    hooks = [
        m.register_forward_hook(lambda mod, i, o, n=name: shapes.__setitem__(n, list(getattr(o, "shape", []))))
        for name, m in model.named_modules()
        if not list(m.children())
    ]
    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        model.eval()(*(example if isinstance(example, tuple) else (example,)))
    for h in hooks:
        h.remove()
    flops = {k.split(".", 1)[1] if "." in k else "": sum(v.values()) for k, v in counter.get_flop_counts().items()}
    rows = []
    for name, module in model.named_modules():
        if list(module.children()):
            continue
        params = list(module.parameters(recurse=False))
        rows.append(
            {
                "name": name,
                "type": type(module).__name__,
                "params": sum(p.numel() for p in params),
                "nonzero": sum(int(torch.count_nonzero(p)) for p in params),
                "output_shape": shapes.get(name),
                "flops": int(flops.get(name, 0)),
            }
        )
    return rows


def analyze_model(recipe, folder: Path | None, console: Console) -> dict:
    """The recipe's model as its task builds it, measured like a run's baseline, and a per-layer table."""
    task = make_task(recipe, folder)
    model = task.setup()
    with tempfile.TemporaryDirectory() as tmp:
        ctx = RunContext(recipe, task, Path(tmp), search_dir=folder)
        metrics, _ = measure(model, ctx, Path(tmp))
        rows = layer_table(model, task.example(1))
    table = Table(title=f"{type(model).__name__} — per layer (batch 1)")
    for col in ("layer", "type", "params", "non-zero", "output", "FLOPs"):
        table.add_column(col, justify="left" if col in ("layer", "type") else "right")
    for r in rows:
        table.add_row(
            r["name"], r["type"], f"{r['params']:,}", f"{r['nonzero']:,}", str(r["output_shape"]), f"{r['flops']:,}"
        )
    console.print(table)
    lat = metrics["latency"]
    console.print(
        f"parameters {metrics['params']:,} (trainable {metrics['trainable_params']:,}, non-zero "
        f"{metrics['nonzero_params']:,}); weights {metrics['weights_bytes']:,} bytes; artifact "
        f"{metrics['size_bytes']:,} bytes; FLOPs {metrics.get('flops', 0):,} per input"
    )
    for runtime, timing in lat.items():
        console.print(
            f"latency {runtime}: p50 {timing['p50']:.2f} ms, p95 {timing['p95']:.2f} ms "
            f"(batch {timing['batch_size']}, {timing['threads']} threads)"
        )
    value = metrics.get(task.metric)
    if isinstance(value, float):
        console.print(
            f"{task.metric.replace('_', ' ')} {value:.4f} on {metrics.get('eval_examples', '?')} held-out "
            "examples (served runtime)"
        )
    return {"metrics": metrics, "layers": rows}
