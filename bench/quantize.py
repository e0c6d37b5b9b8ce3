"""torchslim quantization vs torch.ao and ONNX Runtime's own quantizers, side by side in one run.

    .venv/bin/python bench/quantize.py --model cnn_teacher --weights runs/default/stages/02-export/model.safetensors
    .venv/bin/python bench/quantize.py --model mlp_teacher            # trains the MLP here (about 1 minute)

Same trained model, same real calibration batches (training split), same test set (all 10,000
images), same thread count. Each row is one artifact: accuracy from its own runtime, bytes on disk,
the compute nodes ONNX Runtime's optimised graph runs on integer / float kernels on this CPU, and
latency p50/p95 at the given batch size with the speedup over the float artifact of the same runtime.
All ONNX Runtime artifacts are timed interleaved in one process (spin-free thread pools), as are the
PyTorch ones. A second table shows each static int8 activation scheme on this CPU and the one
`activation_type: auto` (the quantize stage's default) chooses."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import harness
from torchslim.cpu import cpu_features
from torchslim.data import fashion_mnist
from torchslim.export import export_onnx, onnx_outputs
from torchslim.measure.kernels import kernel_counts
from torchslim.measure.latency import interleaved, ort_session, torch_threads
from torchslim.models import MODELS, load_weights
from torchslim.quantize import lower
from torchslim.quantize.scheme import CANDIDATES, choose_scheme
from torchslim.report.json import environment
from torchslim.train import TrainConfig, cross_entropy_loss, fit


class Reader:
    """ONNX Runtime's calibration interface over our real batches."""

    def __init__(self, batches, name="input"):
        self.items = iter([{name: b} for b in batches])

    def get_next(self):
        return next(self.items, None)


def ort_row(path: Path, x, y, args) -> dict:
    session = ort_session(path, args.threads, spinning=False)
    acc = float((onnx_outputs(session, x.numpy()).argmax(1) == y.numpy()).mean())
    counts = kernel_counts(path, args.threads)
    feed = {session.get_inputs()[0].name: x[: args.batch_size].numpy()}
    return {
        "runtime": "onnxruntime",
        "accuracy": acc,
        "bytes": path.stat().st_size,
        "kernels": counts,
        "call": lambda: session.run(None, feed),
    }


def torch_row(model, x, y, args, path: Path) -> dict:
    with torch_threads(args.threads), torch.inference_mode():
        acc = float((torch.cat([model(x[i : i + 500]) for i in range(0, len(x), 500)]).argmax(1) == y).float().mean())
    torch.save(model.state_dict(), path)  # torch.ao quantized modules pack their weights into the state dict
    batch = x[: args.batch_size]

    def call():
        with torch_threads(args.threads), torch.inference_mode():
            model(batch)

    return {"runtime": "pytorch", "accuracy": acc, "bytes": path.stat().st_size, "call": call}


def time_side_by_side(rows: dict, runtime: str, repeats: int) -> None:
    chosen = {k: r["call"] for k, r in rows.items() if r["runtime"] == runtime}
    for name, t in interleaved(chosen, rounds=repeats, warmup=5).items():
        rows[name].update(p50=t["p50"], p95=t["p95"])


def schemes(f32: Path, batches, data, args, tmp: Path, result: harness.Result):
    """Every static int8 activation scheme on this CPU, and the one `activation_type: auto` chooses
    (validation split for the choice, as the quantize stage does; test accuracy shown beside it)."""
    xv, yv = data.val.tensors
    pre = lower.preprocess(f32, tmp / "scheme.pre.onnx")
    ranges = lower.activation_ranges(pre, batches)

    def build(sc, path):
        return lower.static_int8(
            pre,
            path,
            ranges=ranges,
            preprocessed=True,
            activation_type=sc.activation_type,
            reduce_range=sc.reduce_range,
        )

    def accuracy(path, x=xv, y=yv):
        return float((onnx_outputs(ort_session(path, args.threads), x.numpy()).argmax(1) == y.numpy()).mean())

    chosen, record = choose_scheme(
        build, accuracy, f32, data.test.tensors[0][: args.batch_size].numpy(), args.threads, 0.002, rounds=args.repeats
    )
    x, y = data.test.tensors
    print(
        f"\nstatic int8 schemes on this CPU ({', '.join(cpu_features()) or 'features unknown'}), batch "
        f"{args.batch_size}, timed interleaved with the float graph ({record['float_latency_ms']:.3f} ms):"
    )
    print(f"{'scheme':<22} {'int / float nodes':>17} {'p50 ms':>8} {'vs float':>8} {'val acc':>8} {'test acc':>8}")
    table = result.table(
        f"Static int8 activation schemes on this CPU, batch {args.batch_size}, timed interleaved "
        f"with the float graph ({record['float_latency_ms']:.3f} ms); `activation_type: auto` "
        f"chooses {chosen.name}",
        [
            "scheme",
            "chosen",
            "integer nodes",
            "float nodes",
            "p50 (ms)",
            "vs float",
            "validation accuracy",
            "test accuracy",
        ],
        [None, None, None, None, "{:.3f}", "{:.2f}x", "{:.4f}", "{:.4f}"],
    )
    for r in record["candidates"]:
        test = accuracy(build(next(c for c in CANDIDATES if c.name == r["name"]), tmp / "scheme.q.onnx"), x, y)
        print(
            f"{r['name']:<22} {r['integer_nodes']:>8} / {r['float_nodes']:<6} {r['latency_ms']:>8.3f} "
            f"{r['speedup_vs_float']:>7.2f}x {r['val_accuracy']:>8.4f} {test:>8.4f}"
        )
        table.add(
            r["name"],
            r["name"] == chosen.name,
            r["integer_nodes"],
            r["float_nodes"],
            r["latency_ms"],
            r["speedup_vs_float"],
            r["val_accuracy"],
            test,
        )
    print(f"activation_type: auto chooses {chosen.name}")
    return chosen


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="cnn_teacher", choices=sorted(MODELS))
    parser.add_argument("--weights", type=Path, help="trained weights (safetensors); trained here if absent")
    parser.add_argument("--epochs", type=int, default=3, help="training epochs when no weights are given")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--calibration", type=int, default=512, help="real training images for calibration")
    args = parser.parse_args()
    result = harness.start(args, title=f"Quantization side by side: {args.model}", name=f"quantize-{args.model}")
    data = fashion_mnist.load()
    model = MODELS[args.model]()
    if args.weights:
        load_weights(model, args.weights)
    else:
        torch.manual_seed(0)
        fit(
            model,
            data.train,
            TrainConfig(epochs=args.epochs, lr=2e-3, precision="auto"),
            loss_fn=cross_entropy_loss(),
            batch_size=128,
            seed=0,
        )
    model.eval()
    x, y = data.test.tensors
    calib = data.train.tensors[0][: args.calibration].numpy()
    batches = [calib[i : i + 64] for i in range(0, len(calib), 64)]
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        f32 = export_onnx(model, t / "float.onnx", data.input)
        rows["float PyTorch"] = torch_row(model, x, y, args, t / "float.pt")
        rows["float ONNX Runtime"] = ort_row(f32, x, y, args)
        qd = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)
        rows["torch.ao quantize_dynamic"] = torch_row(qd, x, y, args, t / "ao.pt")
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

        with lower.quiet():
            mm = t / "mm.onnx"
            import onnx

            onnx.save(lower.gemm_to_matmul(onnx.load(str(f32))), str(mm))
            quantize_dynamic(str(mm), str(t / "ort_dyn.onnx"), weight_type=QuantType.QInt8)
            pre = lower.preprocess(f32, t / "pre.onnx")
            quantize_static(
                str(pre),
                str(t / "ort_static.onnx"),
                Reader(batches),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QInt8,
                weight_type=QuantType.QInt8,
            )
        rows["ORT quantize_dynamic"] = ort_row(t / "ort_dyn.onnx", x, y, args)
        rows["ORT quantize_static (QDQ, per-channel)"] = ort_row(t / "ort_static.onnx", x, y, args)
        chosen = schemes(f32, batches, data, args, t, result)  # the quantize stage's default: measured on this CPU
        for observer in ("minmax", "percentile", "mse"):
            out = lower.static_int8(
                f32,
                t / f"ts_{observer}.onnx",
                batches,
                observer=observer,
                activation_type=chosen.activation_type,
                reduce_range=chosen.reduce_range,
            )
            rows[f"torchslim static int8 ({observer}, {chosen.name})"] = ort_row(out, x, y, args)
        rows["torchslim dynamic int8"] = ort_row(lower.dynamic_int8(f32, t / "ts_dyn.onnx"), x, y, args)
        for bits in (8, 4):
            out = lower.weight_only(f32, t / f"ts_w{bits}.onnx", bits=bits, group_size=32)
            rows[f"torchslim weight-only int{bits} (group 32)"] = ort_row(out, x, y, args)
        rows["torchslim fp16"] = ort_row(lower.half(f32, t / "fp16.onnx"), x, y, args)
        time_side_by_side(rows, "onnxruntime", args.repeats)
        time_side_by_side(rows, "pytorch", args.repeats)
    base = {"pytorch": rows["float PyTorch"], "onnxruntime": rows["float ONNX Runtime"]}
    print(
        f"\n{args.model}: test set {len(y)} images, batch {args.batch_size}, {args.threads} threads, "
        f"{args.repeats} interleaved rounds; speedup and size are against the float artifact of the same runtime; "
        f"CPU {environment(args.threads)['cpu']} ({', '.join(cpu_features())})"
    )
    print(
        f"{'artifact':<50} {'runtime':<12} {'accuracy':>8} {'Δ pt':>6} {'bytes':>10} {'size':>6} "
        f"{'int/float':>9} {'p50 ms':>7} {'p95 ms':>7} {'speedup':>7}"
    )
    for name, r in rows.items():
        b = base[r["runtime"]]
        k = f"{r['kernels']['integer']}/{r['kernels']['float']}" if "kernels" in r else "–"
        print(
            f"{name:<50} {r['runtime']:<12} {r['accuracy']:>8.4f} {100 * (r['accuracy'] - b['accuracy']):>+6.2f} "
            f"{r['bytes']:>10,} {100 * r['bytes'] / b['bytes']:>5.1f}% {k:>9} {r['p50']:>7.3f} {r['p95']:>7.3f} "
            f"{b['p50'] / r['p50']:>6.2f}x"
        )
    table = result.table(
        f"{args.model}: test set {len(y)} images, batch {args.batch_size}, {args.threads} threads, "
        f"{args.repeats} interleaved rounds; size and speedup against the float artifact of the same "
        f"runtime; integer / float: compute nodes ONNX Runtime's optimised graph runs on each",
        [
            "artifact",
            "runtime",
            "accuracy",
            "Δ pt",
            "bytes",
            "size",
            "integer nodes",
            "float nodes",
            "p50 (ms)",
            "p95 (ms)",
            "speedup",
        ],
        [None, None, "{:.4f}", "{:+.2f}", "{:,}", "{:.1%}", None, None, "{:.3f}", "{:.3f}", "{:.2f}x"],
    )
    for name, r in rows.items():
        b = base[r["runtime"]]
        kernels = r.get("kernels") or {}
        table.add(
            name,
            r["runtime"],
            r["accuracy"],
            100 * (r["accuracy"] - b["accuracy"]),
            r["bytes"],
            r["bytes"] / b["bytes"],
            kernels.get("integer"),
            kernels.get("float"),
            r["p50"],
            r["p95"],
            b["p50"] / r["p50"],
        )
    best = rows[f"torchslim static int8 (minmax, {chosen.name})"]
    fp = base["onnxruntime"]
    result.headline("torchslim static int8 vs float ONNX Runtime: speedup", fp["p50"] / best["p50"], "{:.2f}x")
    result.headline("size", fp["bytes"] / best["bytes"], "{:.2f}x smaller")
    result.headline("accuracy change (points)", 100 * (best["accuracy"] - fp["accuracy"]), "{:+.2f}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
