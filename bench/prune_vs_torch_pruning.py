"""torchslim structured pruning vs Torch-Pruning, side by side in one run.

    .venv/bin/pip install torch-pruning            # or: pip install -e '.[bench]'
    .venv/bin/python bench/prune_vs_torch_pruning.py --teacher runs/default/stages/02-export/model.safetensors

Both tools get the same trained CNN teacher, the same channel ratio (L1 importance, the classifier's
outputs kept), the same fine-tuning (the one torchslim training loop, same epochs, seed and data),
and the same measurement: accuracy of the ONNX artifact in ONNX Runtime on the full Fashion-MNIST
test set, parameters, artifact bytes, and ONNX Runtime latency (batch 32, 2 threads, p50/p95)."""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path

import torch

import harness
from torchslim.data import fashion_mnist
from torchslim.export import export_onnx, onnx_outputs, verify_onnx
from torchslim.measure.latency import onnxruntime_latency, ort_session
from torchslim.models import cnn_teacher, load_weights
from torchslim.prune import structured
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit


def torch_pruning(model: torch.nn.Module, example: torch.Tensor, ratio: float) -> torch.nn.Module:
    import torch_pruning as tp

    pruner = tp.pruner.MagnitudePruner(
        model,
        example,
        importance=tp.importance.MagnitudeImportance(p=1),
        pruning_ratio=ratio,
        ignored_layers=[model.classifier[-1]],
    )
    pruner.step()
    return model


def measure(model, data, path: Path, args) -> dict:
    model.eval()
    onnx = export_onnx(model, path, data.input)
    session = ort_session(onnx, args.threads)
    x, y = data.test.tensors
    verify_onnx(model, session, x[:256])
    accuracy = float((torch.from_numpy(onnx_outputs(session, x.numpy())).argmax(1) == y).float().mean())
    lat = onnxruntime_latency(onnx, x[: args.batch_size].numpy(), args.threads, 20, args.repeats, session)
    return {
        "accuracy": accuracy,
        "params": sum(p.numel() for p in model.parameters()),
        "bytes": onnx.stat().st_size,
        "p50": lat["p50"],
        "p95": lat["p95"],
    }


def main() -> None:
    parser = harness.parser(
        __doc__, threads=2, quick="1 epoch of fine-tuning (and of teacher training without --teacher)"
    )
    parser.add_argument(
        "--teacher", type=Path, help="trained cnn_teacher weights (safetensors); trained here if absent"
    )
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=100)
    args = parser.parse_args()
    teacher_epochs = 1 if args.quick else 3
    if args.quick:
        args.finetune_epochs = 1
    result = harness.start(args, title="Structured pruning vs Torch-Pruning (CNN teacher, fine-tuned)")
    data = fashion_mnist.load()
    validate = partial(evaluate_accuracy, dataset=data.val)
    teacher = cnn_teacher()
    if args.teacher:
        load_weights(teacher, args.teacher)
    else:
        torch.manual_seed(0)
        fit(
            teacher,
            data.train,
            TrainConfig(epochs=teacher_epochs, lr=2e-3, precision="auto"),
            loss_fn=cross_entropy_loss(),
            batch_size=128,
            validate=validate,
            seed=0,
        )
    example = data.test.tensors[0][:2]
    tune = TrainConfig(epochs=args.finetune_epochs, lr=args.lr, precision="auto")
    tools = {
        "torchslim": lambda m: structured(m, example, ratio=args.ratio, importance="l1"),
        "torch-pruning": lambda m: torch_pruning(m, example, args.ratio),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        rows["teacher"] = measure(teacher, data, Path(tmp) / "teacher.onnx", args)
        for name, prune in tools.items():
            model = prune(copy.deepcopy(teacher).eval())
            rows[f"{name} pruned"] = measure(model, data, Path(tmp) / f"{name}-0.onnx", args)
            torch.manual_seed(0)
            fit(model, data.train, tune, loss_fn=cross_entropy_loss(), batch_size=128, validate=validate, seed=0)
            rows[f"{name} + fine-tune"] = measure(model, data, Path(tmp) / f"{name}.onnx", args)
    base = rows["teacher"]
    print(
        f"\nratio={args.ratio} fine-tune={args.finetune_epochs} epochs, ONNX Runtime batch {args.batch_size}, "
        f"{args.threads} threads, {args.repeats} timed runs, test set {len(data.test)} images"
    )
    print(
        f"{'model':<26} {'accuracy':>8} {'Δ pt':>6} {'params':>10} {'params -%':>9} {'bytes':>10} "
        f"{'p50 ms':>7} {'p95 ms':>7} {'speedup':>7}"
    )
    for name, r in rows.items():
        print(
            f"{name:<26} {r['accuracy']:>8.4f} {100 * (r['accuracy'] - base['accuracy']):>+6.2f} "
            f"{r['params']:>10,} {100 * (1 - r['params'] / base['params']):>8.1f}% {r['bytes']:>10,} "
            f"{r['p50']:>7.2f} {r['p95']:>7.2f} {base['p50'] / r['p50']:>6.2f}x"
        )
    table = result.table(
        f"Channel ratio {args.ratio}, fine-tune {args.finetune_epochs} epochs; ONNX Runtime batch "
        f"{args.batch_size}, {args.threads} threads, {args.repeats} timed runs; test set "
        f"{len(data.test)} images" + ("" if args.teacher else f"; teacher trained here {teacher_epochs} epochs"),
        ["model", "accuracy", "Δ pt", "params", "params removed", "ONNX bytes", "p50 (ms)", "p95 (ms)", "speedup"],
        [None, "{:.4f}", "{:+.2f}", "{:,}", "{:.1%}", "{:,}", "{:.2f}", "{:.2f}", "{:.2f}x"],
    )
    for name, r in rows.items():
        table.add(
            name,
            r["accuracy"],
            100 * (r["accuracy"] - base["accuracy"]),
            r["params"],
            1 - r["params"] / base["params"],
            r["bytes"],
            r["p50"],
            r["p95"],
            base["p50"] / r["p50"],
        )
    mine = rows["torchslim + fine-tune"]
    result.headline("torchslim + fine-tune: speedup", base["p50"] / mine["p50"], "{:.2f}x")
    result.headline("accuracy change (points)", 100 * (mine["accuracy"] - base["accuracy"]), "{:+.2f}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
