"""Quantization-aware training recovers what post-training quantization loses, measured in one run.

    .venv/bin/python bench/qat.py [--model cnn_student] [--weight-bits 4] [--epochs 3] [--qat-epochs 2]

Trains the float model, then lowers it twice to the same ONNX Runtime int8 artifact kind (weights on a
`weight-bits` grid per channel in int8 containers, int8 activations): once by PTQ, once after QAT with
the one training loop. Accuracy of each artifact on all 10,000 test images."""

from __future__ import annotations

import copy
import tempfile
from functools import partial
from pathlib import Path

import torch

import harness
from torchslim.data import fashion_mnist
from torchslim.export import export_onnx, onnx_outputs
from torchslim.measure.latency import ort_session
from torchslim.models import MODELS
from torchslim.quantize import lower
from torchslim.quantize.qat import prepare_qat
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit


def main() -> None:
    parser = harness.parser(__doc__, threads=2, quick="1 training epoch and 1 QAT epoch (about a third of the time)")
    parser.add_argument("--model", default="cnn_student", choices=sorted(MODELS))
    parser.add_argument("--weight-bits", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--qat-lr", type=float, default=5e-4)
    parser.add_argument("--learnable-scales", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.qat_epochs = 1, 1
    result = harness.start(
        args, title=f"QAT vs PTQ at {args.weight_bits}-bit weights ({args.model})", name=f"qat-w{args.weight_bits}"
    )
    data = fashion_mnist.load()
    x, y = data.test.tensors
    validate = partial(evaluate_accuracy, dataset=data.val)
    torch.manual_seed(0)
    model = MODELS[args.model]()
    fit(
        model,
        data.train,
        TrainConfig(epochs=args.epochs, lr=2e-3, precision="auto"),
        loss_fn=cross_entropy_loss(),
        batch_size=128,
        validate=validate,
        seed=0,
    )
    calib = data.train.tensors[0][:512].numpy()
    batches = [calib[i : i + 64] for i in range(0, 512, 64)]

    def accuracy(path: Path) -> float:
        return float((onnx_outputs(ort_session(path), x.numpy()).argmax(1) == y.numpy()).mean())

    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        f32 = export_onnx(model.eval(), t / "float.onnx", data.input)
        ptq8 = lower.static_int8(f32, t / "ptq8.onnx", batches)
        ptq = lower.static_int8(f32, t / "ptq.onnx", batches, weight_bits=args.weight_bits)
        qat_model = copy.deepcopy(model)
        handle = prepare_qat(qat_model, weight_bits=args.weight_bits, learnable_scales=args.learnable_scales)
        fit(
            qat_model,
            data.train,
            TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, precision="fp32"),
            loss_fn=cross_entropy_loss(),
            batch_size=128,
            validate=validate,
            seed=1,
            epoch_setup=lambda m, e: handle.freeze_observers() if e >= args.qat_epochs - 1 else None,
        )
        handle.finish()
        # control: the float model trained for the same extra epochs, so QAT's gain is not just more training
        more = copy.deepcopy(model)
        fit(
            more,
            data.train,
            TrainConfig(epochs=args.qat_epochs, lr=args.qat_lr, precision="fp32"),
            loss_fn=cross_entropy_loss(),
            batch_size=128,
            validate=validate,
            seed=1,
        )
        more_f32 = export_onnx(more.eval(), t / "more.onnx", data.input)
        q_f32 = export_onnx(qat_model.eval(), t / "qat_float.onnx", data.input)
        qat = lower.static_int8(q_f32, t / "qat.onnx", batches, weight_bits=args.weight_bits)
        rows = {
            "float": accuracy(f32),
            "PTQ int8": accuracy(ptq8),
            f"PTQ w{args.weight_bits}a8": accuracy(ptq),
            f"QAT w{args.weight_bits}a8 ({args.qat_epochs} epochs)": accuracy(qat),
            f"float + {args.qat_epochs} more epochs": accuracy(more_f32),
            f"PTQ w{args.weight_bits}a8 of that": accuracy(
                lower.static_int8(more_f32, t / "ptq_more.onnx", batches, weight_bits=args.weight_bits)
            ),
        }
    print(f"\n{args.model}, test set {len(y)} images, ONNX Runtime int8 kernels")
    for name, acc in rows.items():
        print(f"{name:<28} accuracy {acc:.4f}  Δ vs float {100 * (acc - rows['float']):+.2f} pt")
    table = result.table(
        f"{args.model} trained {args.epochs} epochs, QAT {args.qat_epochs} epochs at lr {args.qat_lr}; "
        f"test set {len(y)} images, every artifact on ONNX Runtime's int8 kernels",
        ["artifact", "accuracy", "Δ vs float (points)"],
        [None, "{:.4f}", "{:+.2f}"],
    )
    for name, acc in rows.items():
        table.add(name, acc, 100 * (acc - rows["float"]))
    ptq, qat = rows[f"PTQ w{args.weight_bits}a8"], rows[f"QAT w{args.weight_bits}a8 ({args.qat_epochs} epochs)"]
    result.headline(f"PTQ w{args.weight_bits}a8 vs float (points)", 100 * (ptq - rows["float"]), "{:+.2f}")
    result.headline(f"QAT w{args.weight_bits}a8 vs float (points)", 100 * (qat - rows["float"]), "{:+.2f}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
