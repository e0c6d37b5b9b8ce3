"""Latency in the runtime that serves the model: warm-up first, then median, p95 and p99 of timed runs,
and the throughput (items per second) at the median."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from torchslim.export.decoder import complete_feed


@contextmanager
def torch_threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _summarise(samples: list[float], runtime: str, batch_size: int, threads: int, warmup: int) -> dict:
    ms = np.asarray(samples) * 1000.0
    return {
        "p50": float(np.median(ms)),
        "p95": float(np.percentile(ms, 95)),
        "p99": float(np.percentile(ms, 99)),
        "mean": float(ms.mean()),
        "min": float(ms.min()),
        "throughput": float(batch_size * 1000.0 / np.median(ms)),  # items per second at the median
        "batch_size": batch_size,
        "runtime": runtime,
        "threads": threads,
        "warmup": warmup,
        "repeats": len(samples),
    }


def _time(call, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def pytorch_latency(
    model: nn.Module, example: torch.Tensor | tuple, threads: int = 2, warmup: int = 10, repeats: int = 50
) -> dict:
    """`example`: one input tensor, or a tuple of them (e.g. input_ids, attention_mask)."""
    model.eval()
    args = example if isinstance(example, tuple) else (example,)
    with torch_threads(threads), torch.inference_mode():
        samples = _time(lambda: model(*args), warmup, repeats)
    return _summarise(samples, "pytorch", args[0].shape[0], threads, warmup)


def ort_session(path: Path, threads: int = 2, denormal_as_zero: bool = False, spinning: bool = True):
    """`denormal_as_zero` flushes denormal floats to zero in ONNX Runtime's threads (it stays on in
    the calling thread afterwards). `spinning=False` lets idle worker threads sleep at once: needed
    when several sessions are timed side by side, where one session's spinning threads would take
    the cores from the next (measured here: a float CNN 9.6 ms alone, 21.3 ms interleaved with
    spinning, 9.2 ms interleaved without)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if denormal_as_zero:
        opts.add_session_config_entry("session.set_denormal_as_zero", "1")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def onnxruntime_latency(
    path: Path, example: np.ndarray | dict, threads: int = 2, warmup: int = 10, repeats: int = 50, session=None
) -> dict:
    """`example`: the one input array, or a feed {input name: array} for a model of several inputs."""
    session = session or ort_session(path, threads)
    feed = example if isinstance(example, dict) else {session.get_inputs()[0].name: example}
    feed = complete_feed(session, feed)  # a language model's empty key/value cache
    samples = _time(lambda: session.run(None, feed), warmup, repeats)
    return _summarise(samples, "onnxruntime", next(iter(feed.values())).shape[0], threads, warmup)


def interleaved(calls: dict[str, Callable[[], object]], rounds: int = 30, warmup: int = 3) -> dict[str, dict]:
    """Time several callables side by side: every round runs each once (the order reversed every
    other round, so none always goes first), so slow phases of a busy machine hit all of them alike.
    Returns {name: {"p50", "p95", "samples_ms"}}; `ratios` turns two names' samples into per-round ratios."""
    for call in calls.values():
        for _ in range(warmup):
            call()
    names = list(calls)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            samples[name].append((time.perf_counter() - start) * 1000.0)
    return {
        name: {"p50": float(np.median(ms)), "p95": float(np.percentile(ms, 95)), "samples_ms": ms}
        for name, ms in samples.items()
    }


def ratio_spread(slow_ms: list[float], fast_ms: list[float]) -> dict:
    """Per-round ratio slow/fast of two interleaved series: median, quartiles and rounds."""
    r = np.asarray(slow_ms) / np.asarray(fast_ms)
    q25, q50, q75 = np.percentile(r, [25, 50, 75])
    return {"median": float(q50), "q25": float(q25), "q75": float(q75), "iqr": float(q75 - q25), "rounds": len(r)}
