"""Plots drawn from report.json, returned as PNG bytes for embedding."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, ScalarFormatter  # noqa: E402


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def training_curves(name: str, history: list[dict]) -> bytes:
    """Loss parts, validation metric and learning rate per epoch of one training stage."""
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for key in sorted(k for k in history[0] if k.startswith("loss")):
        axes[0].plot(epochs, [h[key] for h in history], marker="o", label=key)
    axes[0].set_title(f"{name}: training loss")
    axes[0].legend()
    if "val_metric" in history[0]:
        axes[1].plot(epochs, [h["val_metric"] for h in history], marker="o", color="tab:green")
    axes[1].set_title("validation metric")
    axes[2].plot(epochs, [h["lr"] for h in history], marker="o", color="tab:purple")
    axes[2].set_title("learning rate")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(fig)


def tradeoff(stages: list[dict], x_key: str, x_label: str, metric: str = "accuracy") -> bytes:
    """One point per stage: a cost (size or latency) against the task metric."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs, ys, labels = [], [], {}
    for i, stage in enumerate(stages):
        m = stage["metrics"]
        xs.append(m["latency_ms"]["p50"] if x_key == "latency" else m["size_bytes"] / 1e6)
        ys.append(m.get(metric, 0.0))
        # stages that land on the same spot share one label
        key = (round(xs[-1], 3 if x_key == "size" else 1), round(ys[-1], 4))
        labels.setdefault(key, []).append(f"{i}:{stage['name']}")
    for (x, y), names in labels.items():
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.plot(xs, ys, linestyle=":", color="grey")
    ax.margins(0.25, 0.12)
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    ax.xaxis.set_major_formatter(formatter)
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.scatter(xs, ys, s=40, zorder=3)
    ax.set_xlabel(x_label)
    ax.set_ylabel(f"test {metric}")
    ax.grid(alpha=0.3)
    return _png(fig)
