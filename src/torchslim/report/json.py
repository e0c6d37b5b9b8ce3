"""report.json: the contract. HTML and plots are drawn from it, never the other way round."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

from torchslim.cpu import cpu_features
from torchslim.io import atomic_write_text, write_json  # noqa: F401  (re-exported)
from torchslim.version import __version__


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

    return {
        "torchslim": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": _cpu_name(),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def _ratio(a, b):
    return float(a) / float(b) if a and b else None


def summary(
    stages: list[dict],
    reference: int,
    metric: str = "accuracy",
    comparison: dict | None = None,
    higher_is_better: bool = True,
) -> dict:
    """Reference stage over final stage: size_ratio and speedup > 1 mean the final model is better;
    `<metric>_drop` (accuracy_drop for classifiers) is how much worse the final model is, in the
    metric's unit: reference minus final, or final minus reference for a lower-is-better metric.
    `speedup` is the interleaved comparison's median per-round ratio (its quartiles beside it) when
    the run made one, else the ratio of the two stages' own measurements (`speedup_source` says which)."""
    ref, final = stages[reference]["metrics"], stages[-1]["metrics"]
    single = _ratio(ref["latency_ms"]["p50"], final["latency_ms"]["p50"])
    out = {
        "reference_stage": stages[reference]["name"],
        "final_stage": stages[-1]["name"],
        "size_ratio": _ratio(ref["size_bytes"], final["size_bytes"]),
        "speedup": single,
        "speedup_source": "stage measurements",
        "speedup_stage_measurements": single,
        "param_ratio": _ratio(ref["params"], final["params"]),
        "storage_ratio": _ratio(ref.get("storage_bytes"), final.get("storage_bytes")),
        # extra training the final model had after the reference (fine-tuning, distillation, QAT)
        "epochs_after_reference": sum(len(st.get("history") or []) for st in stages[reference + 1 :]),
    }
    if comparison and comparison.get("shapes"):
        shapes = comparison["shapes"]
        primary = shapes[comparison["primary"]]["speedup"]
        out.update(
            speedup=primary["median"],
            speedup_q25=primary["q25"],
            speedup_q75=primary["q75"],
            speedup_source=f"interleaved ({comparison['primary']})",
            speedup_by_shape={k: v["speedup"]["median"] for k, v in shapes.items()},
            slowdowns=[{**sd, "shape": k} for k, v in shapes.items() for sd in v["slowdowns"]],
            noisy=comparison["noisy"],
        )
    if metric in ref and metric in final:
        out[f"{metric}_drop"] = (ref[metric] - final[metric]) * (1 if higher_is_better else -1)
    return out


def build_report(
    recipe_dict: dict,
    env: dict,
    stages: list[dict],
    input_spec: dict,
    reference: int,
    status: str,
    metric: str = "accuracy",
    comparison: dict | None = None,
    higher_is_better: bool = True,
) -> dict:
    """`metric` names the task metric in every stage's metrics (accuracy, or mean_cosine for embeddings)."""
    report = {
        "torchslim_version": __version__,
        "status": status,
        "recipe": recipe_dict,
        "environment": env,
        "task_metric": metric,
        "task_metric_higher_is_better": higher_is_better,
        "stages": stages,
        "input": input_spec,
        "summary": summary(stages, reference, metric, comparison, higher_is_better) if stages else {},
    }
    if comparison is not None:
        report["comparison"] = comparison
    return report
