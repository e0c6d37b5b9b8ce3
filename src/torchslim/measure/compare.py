"""The end-of-run side-by-side timing: every stage's served artifact, timed again interleaved in one
process (same inputs, same threads, spin-free thread pools), for every input shape the measure
settings list. The summary's speedup is the median per-round ratio reference/final, with its
quartiles; a stage whose artifact is reliably slower than the one before it is named as a slowdown.

Single per-stage measurements are minutes apart and move with the machine's load (the same file
measured 19.2-22.8 ms p50 across runs here); a ratio taken within one round does not."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable

from torchslim.export.decoder import complete_feed
from torchslim.measure.latency import interleaved, ort_session, ratio_spread

SLOWER = 1.05  # a stage is a slowdown when its median per-round ratio to the stage before exceeds this...
NOISY_IQR = 0.15  # ...and its first quartile exceeds 1; a ratio whose IQR/median exceeds this is noisy
NOISY_TAIL = 1.5  # so is an artifact whose p95/p50 exceeds this


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def compare_stages(
    entries: list[dict],
    run_dir: Path,
    reference: int,
    feeds: Callable[[], dict[str, dict]],
    threads: int,
    seconds: float = 20.0,
    max_rounds: int = 50,
) -> dict:
    """Time every ONNX artifact in `entries` interleaved; `feeds()` gives {shape label: input feed}.
    Returns the record that goes to report.json under "comparison"."""
    onnx = {i: run_dir / e["artifact"] for i, e in enumerate(entries) if str(e["artifact"]).endswith(".onnx")}
    if reference not in onnx or len(entries) - 1 not in onnx:
        return {
            "skipped": "the reference or the final artifact is not an ONNX file (measure.runtime: pytorch); "
            "the summary's speedup comes from the per-stage measurements"
        }
    files: dict[str, Path] = {}
    key_of = {}
    for i, path in onnx.items():  # an export stage's copy of the artifact before it is timed once
        key_of[i] = _digest(path)
        files.setdefault(key_of[i], path)
    sessions = {k: ort_session(p, threads, spinning=False) for k, p in files.items()}
    record: dict = {"threads": threads, "spinning": False, "loadavg_before": _loadavg(), "shapes": {}}
    noise: list[str] = []
    for label, feed in feeds().items():
        calls = {k: (lambda s=s, f=complete_feed(s, feed): s.run(None, f)) for k, s in sessions.items()}
        probe = interleaved(calls, rounds=1, warmup=1)
        per_round = sum(t["p50"] for t in probe.values()) / 1000.0
        rounds = int(max(10, min(max_rounds, seconds / max(per_round, 1e-6))))
        timing = interleaved(calls, rounds=rounds, warmup=2)
        stages = [
            {"index": i, "name": entries[i]["name"], "p50": timing[key_of[i]]["p50"], "p95": timing[key_of[i]]["p95"]}
            for i in sorted(onnx)
        ]
        ref, fin = timing[key_of[reference]], timing[key_of[len(entries) - 1]]
        shape = {
            "batch_size": int(next(iter(feed.values())).shape[0]),
            "rounds": rounds,
            "stages": stages,
            "reference_ms": ref["p50"],
            "final_ms": fin["p50"],
            "speedup": ratio_spread(ref["samples_ms"], fin["samples_ms"]),
            "slowdowns": [],
        }
        indices = sorted(onnx)
        for prev, cur in zip(indices, indices[1:]):
            if key_of[prev] == key_of[cur]:
                continue
            r = ratio_spread(timing[key_of[cur]]["samples_ms"], timing[key_of[prev]]["samples_ms"])
            if r["median"] > SLOWER and r["q25"] > 1.0:
                shape["slowdowns"].append(
                    {
                        "stage": entries[cur]["name"],
                        "index": cur,
                        "after": entries[prev]["name"],
                        "ratio": r["median"],
                        "from_ms": timing[key_of[prev]]["p50"],
                        "to_ms": timing[key_of[cur]]["p50"],
                    }
                )
        s = shape["speedup"]
        if s["iqr"] > NOISY_IQR * s["median"]:
            noise.append(
                f"{label}: the per-round speedup spread (IQR {s['iqr']:.2f} around {s['median']:.2f}x) is wide"
            )
        tails = [st for st in stages if st["p95"] > NOISY_TAIL * st["p50"]]
        if tails:
            noise.append(f"{label}: p95 above {NOISY_TAIL}x p50 for {', '.join(st['name'] for st in tails)}")
        record["shapes"][label] = shape
    record["loadavg_after"] = _loadavg()
    cores = os.cpu_count() or 1
    busy = [la for la in (record["loadavg_before"], record["loadavg_after"]) if la and la[0] > 0.75 * cores + 1]
    if busy:
        noise.append(f"load average {busy[0][0]:.2f} on {cores} cores: other work was running")
    record["noisy"], record["noise"] = bool(noise), noise
    record["primary"] = next(iter(record["shapes"]))
    return record
