"""Low-rank factorisation of the MLP teacher on Fashion-MNIST: a 50% parameter budget with fine-tuning,
against the seed material's fixed rank ratio, side by side in ONNX Runtime.

    .venv/bin/python bench/lowrank.py [--epochs 5] [--finetune 2] [--budget 0.5]

Trains the MLP teacher (or loads --teacher), factorises a copy per rule, fine-tunes each through the
one training loop, and prints parameters, ONNX bytes, ONNX Runtime latency (p50, batch 32, 2 threads,
measured in this run) and test accuracy on all 10,000 images."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path

import torch

import harness
from torchslim.data import fashion_mnist
from torchslim.export.onnx import export_onnx
from torchslim.lowrank import factorize
from torchslim.measure.latency import onnxruntime_latency
from torchslim.models import MODELS, load_weights
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit


def main() -> None:
    parser = harness.parser(__doc__, threads=2, quick="1 teacher epoch and 1 fine-tuning epoch")
    parser.add_argument("--teacher", type=Path, help="trained mlp_teacher weights (default: train here)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--finetune", type=int, default=2)
    parser.add_argument("--budget", type=float, default=0.5)
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.finetune = 1, 1
    result = harness.start(args, title="Low-rank factorisation of the MLP teacher")
    data = fashion_mnist.load()
    torch.manual_seed(0)
    teacher = MODELS["mlp_teacher"]()
    if args.teacher:
        load_weights(teacher, args.teacher)
    else:
        fit(
            teacher,
            data.train,
            TrainConfig(epochs=args.epochs, lr=2e-3),
            loss_fn=cross_entropy_loss(),
            batch_size=128,
            seed=0,
        )
    x = data.test.tensors[0][:2]
    rules = {
        "teacher (dense)": None,
        f"budget {args.budget} (energy-matched ranks)": {"budget": args.budget},
        "rank_ratio 0.5 (seed material)": {"rank_ratio": 0.5},
        "energy 0.9": {"energy": 0.9},
    }
    batch = data.test.tensors[0][:32].numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, rule) in enumerate(rules.items()):
            model = copy.deepcopy(teacher)
            one_shot = None
            if rule is not None:
                factorize(model, x, **rule)
                one_shot = evaluate_accuracy(model, data.test)
                fit(
                    model,
                    data.train,
                    TrainConfig(epochs=args.finetune, lr=5e-4),
                    loss_fn=cross_entropy_loss(),
                    batch_size=128,
                    seed=0,
                )
            path = export_onnx(model.eval(), Path(tmp) / f"m{i}.onnx", data.input)
            lat = onnxruntime_latency(path, batch, args.threads, warmup=20, repeats=200)
            rows.append(
                (
                    name,
                    sum(p.numel() for p in model.parameters()),
                    path.stat().st_size,
                    lat["p50"],
                    one_shot,
                    evaluate_accuracy(model, data.test),
                )
            )
    base = rows[0]
    print(
        f"\nMLP teacher, Fashion-MNIST test (10,000); ONNX Runtime batch 32, {args.threads} threads; "
        f"fine-tune {args.finetune} epochs at lr 5e-4"
    )
    print(
        f"{'model':<34} {'params':>9} {'ratio':>6} {'ONNX bytes':>11} {'p50 ms':>7} {'speedup':>7} "
        f"{'one-shot':>8} {'accuracy':>8} {'drop pt':>7}"
    )
    for name, params, size, p50, one_shot, acc in rows:
        shot = f"{one_shot:.4f}" if one_shot is not None else "–"
        print(
            f"{name:<34} {params:>9,} {params / base[1]:>6.3f} {size:>11,} {p50:>7.3f} {base[3] / p50:>6.2f}x "
            f"{shot:>8} {acc:>8.4f} {100 * (base[5] - acc):>7.2f}"
        )
    table = result.table(
        f"MLP teacher ({'loaded' if args.teacher else f'trained here {args.epochs} epochs'}), "
        f"Fashion-MNIST test (10,000); ONNX Runtime batch 32, {args.threads} threads; fine-tune "
        f"{args.finetune} epochs at lr 5e-4",
        [
            "model",
            "params",
            "param ratio",
            "ONNX bytes",
            "p50 (ms)",
            "speedup",
            "one-shot accuracy",
            "accuracy",
            "drop (points)",
        ],
        [None, "{:,}", "{:.3f}", "{:,}", "{:.3f}", "{:.2f}x", "{:.4f}", "{:.4f}", "{:.2f}"],
    )
    for name, params, size, p50, one_shot, acc in rows:
        table.add(name, params, params / base[1], size, p50, base[3] / p50, one_shot, acc, 100 * (base[5] - acc))
    budget = rows[1]
    result.headline(f"budget {args.budget}: parameters", budget[1] / base[1], "{:.2f}x of the teacher")
    result.headline("speedup", base[3] / budget[3], "{:.2f}x")
    result.headline("accuracy drop (points)", 100 * (base[5] - budget[5]), "{:.2f}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
