"""Float latency of the built-in models in PyTorch eager vs ONNX Runtime, side by side in one run.

    .venv/bin/python bench/runtimes.py [--threads 2] [--repeats 100]

Inputs are real Fashion-MNIST test images; dense float32 latency does not depend on weight values,
so the models keep their seeded initial weights. Prints one row per model and batch size with the
ratio PyTorch / ONNX Runtime measured in the same process."""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import harness
from torchslim.data import fashion_mnist
from torchslim.export import export_onnx
from torchslim.measure.latency import onnxruntime_latency, pytorch_latency
from torchslim.models import MODELS


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    result = harness.start(args, title="Float runtimes: PyTorch eager vs ONNX Runtime")
    table = result.table(
        f"Float latency, {args.threads} threads, {args.warmup} warm-up and {args.repeats} timed runs, real test images",
        [
            "model",
            "batch",
            "PyTorch p50 (ms)",
            "PyTorch p95 (ms)",
            "ONNX Runtime p50 (ms)",
            "ONNX Runtime p95 (ms)",
            "PyTorch / ORT",
        ],
        [None, None, "{:.3f}", "{:.3f}", "{:.3f}", "{:.3f}", "{:.2f}x"],
    )
    data = fashion_mnist.load(eval_subset=max(args.batch_sizes))
    images = data.test.tensors[0]
    print(f"threads={args.threads} repeats={args.repeats} warmup={args.warmup} torch={torch.__version__}")
    print(f"{'model':<12} {'batch':>5} {'pytorch p50':>12} {'p95':>8} {'ort p50':>9} {'p95':>8} {'pt/ort':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, build in MODELS.items():
            torch.manual_seed(0)
            model = build().eval()
            path = export_onnx(model, Path(tmp) / f"{name}.onnx", data.input)
            for batch in args.batch_sizes:
                x = images[:batch].contiguous()
                pt = pytorch_latency(model, x, args.threads, args.warmup, args.repeats)
                ort = onnxruntime_latency(path, x.numpy(), args.threads, args.warmup, args.repeats)
                print(
                    f"{name:<12} {batch:>5} {pt['p50']:>10.3f}ms {pt['p95']:>7.3f} {ort['p50']:>7.3f}ms "
                    f"{ort['p95']:>7.3f} {pt['p50'] / ort['p50']:>6.2f}x"
                )
                table.add(name, batch, pt["p50"], pt["p95"], ort["p50"], ort["p95"], pt["p50"] / ort["p50"])
                if name == "cnn_teacher" and batch == max(args.batch_sizes):
                    result.headline(
                        f"cnn_teacher at batch {batch}: PyTorch / ONNX Runtime", pt["p50"] / ort["p50"], "{:.2f}x"
                    )
    result.save(echo=False)


if __name__ == "__main__":
    main()
