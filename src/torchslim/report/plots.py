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
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        else:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(fig)


def tradeoff(stages: list[dict], x_key: str, x_label: str, metric: str = "accuracy") -> bytes:
    """One point per stage: a cost (size or latency) against the task metric."""
    fig, ax = plt.subplots(figsize=(5.5, 4))
    xs = [s["metrics"]["latency_ms"]["p50"] if x_key == "latency" else s["metrics"]["size_bytes"] / 1e6 for s in stages]
    ys = [s["metrics"].get(metric, 0.0) for s in stages]
    span_x, span_y = (max(xs) - min(xs)) or 1.0, (max(ys) - min(ys)) or 1.0
    labels: dict[tuple, list[str]] = {}
    for i, (stage, x, y) in enumerate(zip(stages, xs, ys)):
        # stages within 3% of the axis span of each other share one label
        key = next((k for k in labels if abs(k[0] - x) < 0.03 * span_x and abs(k[1] - y) < 0.03 * span_y), (x, y))
        labels.setdefault(key, []).append(f"{i}:{stage['name']}")
    placed: list[tuple[float, float]] = []
    for (x, y), names in sorted(labels.items()):
        # a label near an earlier one (in reading order) goes a line higher, so the texts never overlap
        near = sum(abs(px - x) < 0.3 * span_x and abs(py - y) < 0.1 * span_y for px, py in placed)
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(5, 5 + 11 * near), fontsize=8)
        placed.append((x, y))
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


def layer_sparsity_bars(name: str, rows: list[dict]) -> bytes:
    """Per-layer share removed (channels for structured pruning, weights for unstructured), labelled."""
    labels = [r["layer"] for r in rows]
    values = [100 * r["sparsity"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows) + 2), 3.6))
    bars = ax.bar(range(len(rows)), values, color="tab:red", alpha=0.75)
    for bar, r, v in zip(bars, rows, values):
        text = f"{v:.0f}%" if "before" not in r else f"{r['before']}→{r['after']}"
        ax.annotate(
            text,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(range(len(rows)), labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("removed (%)")
    ax.set_ylim(0, 110)
    ax.set_title(f"{name}: per-layer sparsity")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def sparsity_over_steps(name: str, steps: list[dict]) -> bytes:
    """Target and reached sparsity (share of parameters gone or zero) after each pruning step."""
    xs = [s["step"] for s in steps]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(xs, [100 * s["target"] for s in steps], marker="o", label="target")
    reached = [100 * max(s.get("param_reduction", 0), s.get("sparsity", 0)) for s in steps]
    ax.plot(xs, reached, marker="s", label="parameters removed or zero")
    if all("val_metric" in s and s["val_metric"] is not None for s in steps):
        ax2 = ax.twinx()
        ax2.plot(xs, [s["val_metric"] for s in steps], color="tab:green", marker="^", label="val metric")
        ax2.set_ylabel("validation metric after fine-tuning", color="tab:green")
    ax.set_xticks(xs)
    ax.set_xlabel("pruning step")
    ax.set_ylabel("%")
    ax.set_title(f"{name}: sparsity over steps")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(fig)


def sensitivity_bars(name: str, rows: list[dict]) -> bytes:
    """Validation accuracy drop (points) when only that layer is quantized."""
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 3.6))
    values = [100 * r["drop"] for r in rows]
    bars = ax.bar(range(len(rows)), values, color="tab:orange")
    for bar, v in zip(bars, values):
        ax.annotate(
            f"{v:.2f}",
            (bar.get_x() + bar.get_width() / 2, max(v, 0)),
            ha="center",
            va="bottom",
            fontsize=7,
            xytext=(0, 2),
            textcoords="offset points",
        )
    ax.set_xticks(range(len(rows)), [r["layer"] for r in rows], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("accuracy drop (points)")
    ax.set_title(f"{name}: per-layer quantization sensitivity")
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def distillation_curves(name: str, history: list[dict], weights: dict[str, float]) -> bytes:
    """The four distillation plots: total loss; hard vs soft loss; validation accuracy; the share of
    each weighted loss part in the total."""
    epochs = [h["epoch"] for h in history]
    parts = [k[len("loss_") :] for k in history[0] if k.startswith("loss_")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    axes[0].plot(epochs, [h["loss"] for h in history], marker="o")
    axes[0].set_title(f"{name}: total loss")
    for key in ("hard", "soft"):
        if f"loss_{key}" in history[0]:
            axes[1].plot(epochs, [h[f"loss_{key}"] for h in history], marker="o", label=key)
    axes[1].set_title("hard vs soft loss")
    axes[1].legend()
    if "val_metric" in history[0]:
        axes[2].plot(epochs, [h["val_metric"] for h in history], marker="o", color="tab:green")
    axes[2].set_title("validation accuracy")
    weighted = {p: [weights.get(p, 1.0) * h[f"loss_{p}"] for h in history] for p in parts}
    totals = [sum(v[i] for v in weighted.values()) or 1.0 for i in range(len(epochs))]
    axes[3].stackplot(
        epochs, *[[v / t for v, t in zip(vals, totals)] for vals in weighted.values()], labels=list(weighted)
    )
    axes[3].set_title("share of each loss part")
    axes[3].set_ylim(0, 1)
    axes[3].legend(fontsize=7, loc="lower right")
    for ax in axes:
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    return _png(fig)


def pareto(info: dict) -> bytes:
    """The planner's search: candidates, the front, fine-tuned trials, the chosen plan."""
    key = "latency_ms" if info["objective"] == "latency" else "size_bytes"
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ok = [c for c in info["candidates"] if key in c]
    ax.scatter(
        [c[key] for c in ok], [c["val_accuracy"] for c in ok], s=18, color="lightgrey", label="candidate (one-shot)"
    )
    front = info["front"]
    ax.plot(
        [c[key] for c in front],
        [c["val_accuracy"] for c in front],
        marker="o",
        color="tab:blue",
        label="Pareto front (one-shot)",
    )
    trials = info["trials"]
    ax.scatter(
        [t[key] for t in trials],
        [t["val_accuracy"] for t in trials],
        marker="s",
        s=40,
        color=["tab:green" if t["meets_budget"] else "tab:red" for t in trials],
        label="fine-tuned trial (green: within budget)",
        zorder=3,
    )
    if info.get("chosen_trial") is not None:
        t = trials[info["chosen_trial"]]
        ax.scatter(
            [t[key]],
            [t["val_accuracy"]],
            marker="*",
            s=220,
            color="gold",
            edgecolor="black",
            label="chosen plan",
            zorder=4,
        )
    ax.axhline(
        info["val_accuracy"] - info["allowed_val_drop"],
        color="grey",
        linestyle=":",
        label="accuracy floor (budget minus margin)",
    )
    ax.set_xlabel("latency p50 (ms)" if key == "latency_ms" else "artifact size (bytes)")
    ax.set_ylabel("validation accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _png(fig)
