"""report.json: the contract. HTML and plots are drawn from it, never the other way round."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

import torch


def atomic_write_text(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(threads: int) -> dict:
    import onnxruntime

    from torchslim import __version__
    return {"torchslim": __version__, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(), "threads": threads, "cpu": _cpu_name(),
            "cores": os.cpu_count(), "platform": platform.platform()}


def _ratio(a, b):
    return float(a) / float(b) if a and b else None


def summary(stages: list[dict], reference: int, metric: str = "accuracy") -> dict:
    """Reference stage over final stage: size_ratio and speedup > 1 mean the final model is better;
    `<metric>_drop` (accuracy_drop for classifiers) is reference minus final, in the metric's unit."""
    ref, final = stages[reference]["metrics"], stages[-1]["metrics"]
    out = {"reference_stage": stages[reference]["name"], "final_stage": stages[-1]["name"],
           "size_ratio": _ratio(ref["size_bytes"], final["size_bytes"]),
           "speedup": _ratio(ref["latency_ms"]["p50"], final["latency_ms"]["p50"]),
           "param_ratio": _ratio(ref["params"], final["params"]),
           "storage_ratio": _ratio(ref.get("storage_bytes"), final.get("storage_bytes"))}
    if metric in ref and metric in final:
        out[f"{metric}_drop"] = ref[metric] - final[metric]
    return out


def build_report(recipe_dict: dict, env: dict, stages: list[dict], input_spec: dict, reference: int,
                 status: str, metric: str = "accuracy") -> dict:
    """`metric` names the task metric in every stage's metrics (accuracy, or mean_cosine for embeddings)."""
    from torchslim import __version__
    return {"torchslim_version": __version__, "status": status, "recipe": recipe_dict, "environment": env,
            "task_metric": metric, "stages": stages, "input": input_spec,
            "summary": summary(stages, reference, metric) if stages else {}}
