"""Structured pruning coverage: torchslim and Torch-Pruning side by side on the coverage zoo.

    .venv/bin/pip install --no-deps torch-pruning     # the peer (optional: without it, its columns say so)
    .venv/bin/python bench/prune_coverage.py                   # every zoo model, ratio 0.5
    .venv/bin/python bench/prune_coverage.py --bert-base       # adds BERT-base (12 x 768) heads + FFN latency

Every model (random weights, built from configs or from tests/prune_zoo.py) is pruned at the same
ratio by both tools with their default settings (L1 magnitude; Torch-Pruning is told to leave the
layer that produces the output alone, as its docs do). For each tool: captured or the error, the
parameter reduction, whether the output shape is kept, the largest output difference of the pruned
model against itself reloaded (torchslim: safetensors into a freshly built model; Torch-Pruning:
its documented whole-module pickle), and ONNX Runtime latency of the original and both pruned
models at a realistic input (224x224 images, 128-token sequences), timed interleaved in one process
with the per-round ratio's quartiles. Where both tools arrive at the same widths the two exported graphs
are the same, so the difference between their latencies is the timing's own spread."""

from __future__ import annotations

import copy
import io
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import harness  # noqa: E402
from prune_zoo import ZOO, build, example, run  # noqa: E402
from torchslim.export.onnx import export_inputs  # noqa: E402
from torchslim.measure.latency import interleaved, ort_session, ratio_spread  # noqa: E402
from torchslim.models import load_weights, save_weights  # noqa: E402
from torchslim.prune import structured  # noqa: E402


class MainOutput(nn.Module):
    """The model's main output as one tensor, with its inputs positional (for the ONNX export)."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *args):
        inputs = dict(zip(self.names, args)) if self.names else args[0]
        return run(self.model, inputs) if self.names else run(self.model, args[0])


def _feed(inputs) -> tuple[list[str], tuple]:
    if isinstance(inputs, dict):
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return list(tensors), tuple(tensors.values())
    return [], (inputs,)


def output_layers(model: nn.Module, inputs) -> list[nn.Module]:
    """Layers whose output width is the model's output width (what Torch-Pruning must be told to keep)."""
    width = run(model, inputs).shape[-1 if run(model, inputs).dim() != 4 else 1]
    last = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == width] + [
        m for m in model.modules() if isinstance(m, nn.Conv2d) and m.out_channels == width
    ]
    return last[-1:]


def torch_pruning(model: nn.Module, inputs, ratio: float) -> nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(
        model,
        inputs,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=output_layers(model, inputs),
    )
    pruner.step()
    return model


def reload_diff_torchslim(name: str, model: nn.Module, inputs, tmp: Path) -> float:
    save_weights(model, tmp / f"{name}.safetensors")
    fresh = load_weights(build(name, seed=1), tmp / f"{name}.safetensors").eval()
    return float((run(fresh, inputs) - run(model, inputs)).abs().max())


def reload_diff_pickle(model: nn.Module, inputs) -> float:
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    fresh = torch.load(buffer, weights_only=False).eval()
    return float((run(fresh, inputs) - run(model, inputs)).abs().max())


def _why(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:90]}" if lines else type(exc).__name__


class TimeLimit(Exception):
    pass


def _alarm(signum, frame):
    raise TimeLimit


def prune_with(tool: str, name: str, original: nn.Module, small, ratio: float, tmp: Path, limit_s: int) -> dict:
    model = copy.deepcopy(original)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(limit_s)
    try:
        if tool == "torchslim":
            structured(model, small, ratio=ratio, verbose=False)
        else:
            torch_pruning(model, small, ratio)
        out = run(model, small)
    except TimeLimit:
        return {"error": f"did not finish in {limit_s} s"}
    except Exception as exc:  # the row reports the error; the benchmark goes on
        return {"error": _why(exc)}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    reference = run(original, small)
    row = {
        "model": model,
        "params": sum(p.numel() for p in model.parameters()),
        "shapes": [tuple(p.shape) for p in model.parameters()],
        "shape": tuple(out.shape) == tuple(reference.shape),
        "finite": bool(torch.isfinite(out).all()),
    }
    try:
        row["reload"] = (
            reload_diff_torchslim(name, model, small, tmp) if tool == "torchslim" else reload_diff_pickle(model, small)
        )
    except Exception as exc:
        row["reload_error"] = type(exc).__name__
    return row


def latencies(models: dict[str, nn.Module], inputs, tmp: Path, threads: int, rounds: int) -> dict:
    names, args = _feed(inputs)
    calls = {}
    for label, model in models.items():
        path = tmp / f"{label}.onnx"
        export_inputs(
            MainOutput(model, names).eval(),
            path,
            args,
            names or ["input"],
            [{0: "batch"} for _ in args],
            exporter="dynamo",
        )
        session = ort_session(
            path, threads, spinning=False
        )  # idle threads must not take the cores from the next session
        feed = {i.name: a.numpy() for i, a in zip(session.get_inputs(), args)}
        calls[label] = lambda s=session, f=feed: s.run(None, f)
    return interleaved(calls, rounds=rounds, warmup=3)


def one(name: str, args, tmp: Path) -> dict:
    original, small = build(name), example(name)
    before = sum(p.numel() for p in original.parameters())
    rows = {tool: prune_with(tool, name, original, small, args.ratio, tmp, args.limit) for tool in args.tools}
    result = {"name": name, "params": before, "rows": rows}
    if args.latency:
        big = example(name, batch=args.batch, size=ZOO[name][2])
        models = {"original": original, **{t: r["model"] for t, r in rows.items() if "model" in r and r["shape"]}}
        try:
            result["latency"] = latencies(models, big, tmp, args.threads, args.rounds)
        except Exception as exc:
            result["latency_error"] = _why(exc)
    return result


def _cell(row: dict, before: int) -> str:
    if "error" in row:
        return f"{'fails':>8}  {row['error'][:60]}"
    reload = f"{row['reload']:.0e}" if "reload" in row else row.get("reload_error", "?")
    return (
        f"{100 * (1 - row['params'] / before):>6.1f}%  shape {'kept' if row['shape'] else 'CHANGED'}  "
        f"reload {reload:>6}"
    )


def report(result: dict, table: harness.Table) -> None:
    print(f"\n{result['name']}  ({result['params']:,} parameters)")
    mine = result["rows"].get("torchslim", {}).get("shapes")
    for tool, row in result["rows"].items():
        line = f"  {tool:<14} {_cell(row, result['params'])}"
        same = tool != "torchslim" and bool(mine) and row.get("shapes") == mine
        if same:
            line += "  (torchslim's widths)"
        lat = result.get("latency", {})
        spread = None
        if tool in lat:
            spread = ratio_spread(lat["original"]["samples_ms"], lat[tool]["samples_ms"])
            line += (
                f"  ORT {lat['original']['p50']:.2f} -> {lat[tool]['p50']:.2f} ms  "
                f"{spread['median']:.2f}x ({spread['q25']:.2f}-{spread['q75']:.2f})"
            )
        print(line)
        failed = "error" in row
        table.add(
            result["name"],
            result["params"],
            tool,
            None if failed else 1 - row["params"] / result["params"],
            None if failed else row["shape"],
            row.get("reload", row.get("reload_error")),
            same if tool != "torchslim" else None,
            lat["original"]["p50"] if tool in lat else None,
            lat[tool]["p50"] if tool in lat else None,
            spread,
            row.get("error") or result.get("latency_error"),
        )
    if "latency_error" in result:
        print(f"  latency: {result['latency_error']}")


def bert_base(args, tmp: Path, result: harness.Result) -> None:
    """BERT-base (12 layers, hidden 768, 12 heads, FFN 3072) from its config: half the heads and FFN
    neurons removed, ONNX Runtime at batch 8 x 128 tokens, side by side."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval()
    small = {"input_ids": torch.randint(0, 30522, (2, 16)), "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    pruned = structured(copy.deepcopy(model), small, ratio=args.ratio, verbose=False)
    big = {"input_ids": torch.randint(0, 30522, (8, 128)), "attention_mask": torch.ones(8, 128, dtype=torch.long)}
    lat = latencies({"original": model, "torchslim": pruned}, big, tmp, args.threads, args.rounds)
    spread = ratio_spread(lat["original"]["samples_ms"], lat["torchslim"]["samples_ms"])
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, pruned))
    heads = pruned.encoder.layer[0].attention.self.num_attention_heads
    ffn = pruned.encoder.layer[0].intermediate.dense.out_features
    print(
        f"\nBERT-base (12 x 768) heads 12 -> {heads}, FFN 3072 -> {ffn}, params {before:,} -> {after:,}; "
        f"ONNX Runtime batch 8 x 128 tokens, {args.threads} threads, {args.rounds} interleaved rounds: "
        f"{lat['original']['p50']:.1f} -> {lat['torchslim']['p50']:.1f} ms, {spread['median']:.2f}x faster "
        f"(quartiles {spread['q25']:.2f}-{spread['q75']:.2f})"
    )
    table = result.table(
        f"BERT-base (12 x 768, from BertConfig()): heads and FFN neurons pruned at ratio {args.ratio}; "
        f"ONNX Runtime batch 8 x 128 tokens, {args.threads} threads, {args.rounds} interleaved rounds",
        [
            "heads",
            "FFN",
            "parameters before",
            "parameters after",
            "p50 before (ms)",
            "p50 after (ms)",
            "speedup (quartiles)",
        ],
        [None, None, None, None, "{:.1f}", "{:.1f}", "{:.2f}x"],
    )
    table.add(
        f"12 -> {heads}", f"3072 -> {ffn}", before, after, lat["original"]["p50"], lat["torchslim"]["p50"], spread
    )
    result.headline("BERT-base, half the heads and FFN removed: ORT speedup", spread["median"], "{:.2f}x", spread)


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--models", nargs="*", default=list(ZOO), choices=list(ZOO))
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--limit", type=int, default=300, help="seconds a tool may take to prune one model")
    parser.add_argument("--no-latency", dest="latency", action="store_false")
    parser.add_argument("--bert-base", action="store_true", help="also time BERT-base with heads and FFN pruned")
    args = parser.parse_args()
    result = harness.start(
        args, title="Structured pruning coverage: torchslim vs Torch-Pruning", code=["tests/prune_zoo.py"]
    )
    try:
        import torch_pruning  # noqa: F401

        args.tools = ["torchslim", "torch-pruning"]
    except ImportError:
        print("torch-pruning is not installed (pip install --no-deps torch-pruning): torchslim only")
        result.note("Torch-Pruning was not installed (pip install --no-deps torch-pruning): torchslim only")
        args.tools = ["torchslim"]
    print(f"ratio {args.ratio}; ONNX Runtime {args.threads} threads, batch {args.batch}")
    table = result.table(
        f"Every zoo model pruned at ratio {args.ratio} by each tool (L1 magnitude, defaults); "
        f"ONNX Runtime at batch {args.batch}, {args.threads} threads, original and pruned models "
        f"timed interleaved ({args.rounds} rounds)",
        [
            "model",
            "parameters",
            "tool",
            "removed",
            "output shape kept",
            "reload max diff",
            "same widths as torchslim",
            "ORT original p50 (ms)",
            "ORT pruned p50 (ms)",
            "ORT speedup (quartiles)",
            "error",
        ],
        [None, None, None, "{:.1%}", None, "{:.0e}", None, "{:.2f}", "{:.2f}", "{:.2f}x", None],
    )
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            try:
                results.append(one(name, args, Path(tmp)))
                report(results[-1], table)
            except Exception:
                print(f"\n{name}: benchmark error\n{traceback.format_exc(limit=3)}")
        if args.bert_base:
            bert_base(args, Path(tmp), result)
    for tool in args.tools:
        ok = [r["name"] for r in results if _pruned(r["rows"][tool], r["params"], 0.0)]
        strong = [r["name"] for r in results if _pruned(r["rows"][tool], r["params"], 0.3)]
        missing = sorted({r["name"] for r in results} - set(ok))
        print(
            f"\n{tool}: pruned {len(ok)} of {len(results)} (output shape kept, parameters down), "
            f"{len(strong)} by at least 30%{'; not pruned: ' + ', '.join(missing) if missing else ''}"
        )
        result.headline(f"{tool}: models pruned", f"{len(ok)} of {len(results)}")
        result.note(
            f"{tool}: pruned {len(ok)} of {len(results)} (output shape kept, parameters down), "
            f"{len(strong)} by at least 30%{'; not pruned: ' + ', '.join(missing) if missing else ''}"
        )
    result.save()


def _pruned(row: dict, before: int, at_least: float) -> bool:
    return "error" not in row and row["shape"] and row["finite"] and 1 - row["params"] / before > at_least


if __name__ == "__main__":
    main()
