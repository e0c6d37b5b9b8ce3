"""report.html: one self-contained file (plots embedded as PNG) drawn from report.json."""

from __future__ import annotations

import base64
from pathlib import Path

from jinja2 import Environment, PackageLoader, select_autoescape

from torchslim import words
from torchslim.io import atomic_write_text
from torchslim.report import plots


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode()


def render_html(report: dict) -> str:
    stages = report["stages"]
    latency = report["stages"][0]["metrics"]["latency_ms"] if stages else {}
    figures, overview = [], None
    metric = report.get("task_metric", "accuracy")
    label = metric.replace("_", " ")
    if stages:
        figures.append((f"Size vs {label}", _b64(plots.tradeoff(stages, "size", "artifact size (MB)", metric))))
        overview = (
            f"Latency vs {label} per stage ({latency.get('runtime')}, batch {latency.get('batch_size')}, "
            f"{latency.get('threads')} threads)",
            _b64(plots.tradeoff(stages, "latency", "latency p50 (ms)", metric)),
        )
    searched = [(i, st["auto"]) for i, st in enumerate(stages) if st.get("auto")]
    if searched:
        i, info = searched[-1]
        unit = "latency p50 (ms)" if info["objective"] == "latency" else "artifact size (bytes)"
        overview = (
            f"Planner (stage {i}): every measured candidate (one-shot validation accuracy), the Pareto "
            f"front, the fine-tuned trials and the chosen plan — {unit}",
            _b64(plots.pareto(info)),
        )
        figures.append(("Latency vs accuracy per stage", _b64(plots.tradeoff(stages, "latency", "latency p50 (ms)"))))
    for i, stage in enumerate(stages):
        label = f"stage {i} ({stage['name']})"
        if stage.get("history") and stage.get("comparison"):
            figures.append(
                (
                    f"Distillation — {label}",
                    _b64(plots.distillation_curves(stage["name"], stage["history"], stage.get("weights", {}))),
                )
            )
        elif stage.get("history"):
            figures.append((f"Training curves — {label}", _b64(plots.training_curves(stage["name"], stage["history"]))))
        if stage.get("layers"):
            figures.append((f"Per-layer sparsity — {label}", _b64(plots.layer_sparsity_bars(label, stage["layers"]))))
        if stage.get("quantization", {}).get("sensitivity"):
            figures.append(
                (
                    f"Quantization sensitivity — {label}",
                    _b64(plots.sensitivity_bars(label, stage["quantization"]["sensitivity"])),
                )
            )
        if stage.get("steps") and len(stage["steps"]) > 1:
            figures.append(
                (f"Sparsity over pruning steps — {label}", _b64(plots.sparsity_over_steps(label, stage["steps"])))
            )
    env = Environment(loader=PackageLoader("torchslim", "report/templates"), autoescape=select_autoescape())
    env.filters.update(speed=lambda r: words.speed(r or 0.0), points=lambda change: words.points(change or 0.0))
    return env.get_template("report.html").render(report=report, figures=figures, overview=overview)


def write_html(report: dict, path: Path) -> Path:
    atomic_write_text(Path(path), render_html(report))
    return Path(path)
