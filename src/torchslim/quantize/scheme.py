"""Choosing the static int8 scheme for the CPU the model will run on, by measuring it there.

Which activation type ONNX Runtime turns into integer kernels, and how fast, depends on the CPU:
with VNNI (Intel Xeon, recent AMD) S8S8 QDQ is the recommended default; on AVX2 without VNNI, ONNX
Runtime leaves many S8S8 convolutions as float Conv between Q/DQ pairs (slower than float), while
U8S8 runs on integer kernels (with 7-bit weights, `reduce_range`, to stay clear of the int16
saturation of AVX2's u8*s8 multiply-add). So every candidate is built, its optimised graph counted,
its latency timed interleaved with the others, and its validation accuracy checked; among the schemes
within the accuracy tolerance, those with the most nodes on integer kernels qualify, and the fastest
of them wins."""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from torchslim.errors import TorchslimError
from torchslim.measure.kernels import kernel_counts
from torchslim.measure.latency import interleaved, ort_session


@dataclass(frozen=True)
class Scheme:
    name: str
    activation_type: str  # int8 | uint8
    reduce_range: bool


CANDIDATES = (Scheme("S8S8", "int8", False), Scheme("U8S8 reduce_range", "uint8", True), Scheme("U8S8", "uint8", False))


def scheme_for(activation_type: str, reduce_range: bool) -> Scheme:
    name = "S8S8" if activation_type == "int8" else "U8S8"
    return Scheme(name + (" reduce_range" if reduce_range else ""), activation_type, reduce_range)


def choose_scheme(
    build: Callable[[Scheme, Path], Path],
    accuracy: Callable[[Path], float],
    float_onnx: Path,
    batch: np.ndarray | dict,
    threads: int,
    tolerance: float,
    rounds: int = 30,
) -> tuple[Scheme, dict]:
    """Build every candidate with `build(scheme, path)`, then keep the fastest of those whose validation
    `accuracy(path)` is within `tolerance` of the most accurate candidate's and that run the most
    compute nodes on integer kernels. Returns the scheme and a
    record of every candidate (latency interleaved with the float graph, integer/float node counts)."""
    with tempfile.TemporaryDirectory() as tmp:
        paths, failed = {}, {}
        for i, scheme in enumerate(CANDIDATES):
            try:
                paths[scheme] = build(scheme, Path(tmp) / f"{i}.onnx")
            except Exception as exc:  # ONNX Runtime's quantizer rejects some graphs in some schemes
                failed[scheme.name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        if not paths:
            raise TorchslimError(
                "static int8: no activation scheme could be built for this model: "
                + "; ".join(f"{k}: {v}" for k, v in failed.items())
            )
        sessions = {"float": ort_session(float_onnx, threads, spinning=False)}
        sessions.update({s.name: ort_session(p, threads, spinning=False) for s, p in paths.items()})
        feed = batch if isinstance(batch, dict) else {sessions["float"].get_inputs()[0].name: batch}
        timing = interleaved({k: (lambda s=s: s.run(None, feed)) for k, s in sessions.items()}, rounds=rounds)
        rows = []
        for scheme, path in paths.items():
            counts = kernel_counts(path, threads)
            rows.append(
                {
                    **asdict(scheme),
                    "latency_ms": timing[scheme.name]["p50"],
                    "speedup_vs_float": timing["float"]["p50"] / timing[scheme.name]["p50"],
                    "integer_nodes": counts["integer"],
                    "float_nodes": counts["float"],
                    "val_accuracy": accuracy(path),
                }
            )
    best = max(r["val_accuracy"] for r in rows)
    eligible = [r for r in rows if r["val_accuracy"] >= best - tolerance]
    covered = max(r["integer_nodes"] for r in eligible)  # a scheme that leaves nodes in float between Q/DQ
    eligible = [r for r in eligible if r["integer_nodes"] == covered]  # pairs is not int8, whatever its speed
    chosen = min(eligible, key=lambda r: r["latency_ms"])
    record = {
        "chosen": chosen["name"],
        "tolerance": tolerance,
        "float_latency_ms": timing["float"]["p50"],
        "batch_size": int(next(iter(feed.values())).shape[0]),
        "threads": threads,
        "candidates": rows,
        "failed": failed,
    }
    return next(s for s in CANDIDATES if s.name == chosen["name"]), record
