"""Distillation vs training the student alone, same budget, over several seeds — and the teacher cache.

    .venv/bin/python bench/distill.py --teacher runs/default/stages/02-export/model.safetensors \
        [--epochs 6] [--seeds 0 1 2]

For every seed the same student (same initial weights, same batches) is trained twice with the one
training loop: with cross-entropy alone, and with the distillation loss (temperature, soft and hard
weights as given). Test accuracy on all 10,000 images; mean and standard deviation over seeds.
Then one epoch with the teacher run every step vs read from the on-disk cache: time ratio and the
largest weight difference."""

from __future__ import annotations

import statistics
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

import harness
from torchslim.data import fashion_mnist
from torchslim.distill.distiller import Distiller, FeatureTerm, Indexed, teacher_cache
from torchslim.distill.students import derive_width
from torchslim.models import MODELS, load_weights
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit


def main() -> None:
    parser = harness.parser(__doc__, threads=2, quick="one seed, 2 epochs")
    parser.add_argument("--teacher", type=Path, required=True, help="trained cnn_teacher weights (safetensors)")
    parser.add_argument("--student", default="cnn_student", choices=sorted(MODELS))
    parser.add_argument(
        "--derive-width",
        type=float,
        default=None,
        metavar="RATIO",
        help="student = the teacher with RATIO of its channels removed (structured pruning); "
        "'alone' trains it from the same initialisation with cross-entropy, "
        "'scratch' trains the same architecture from random weights",
    )
    parser.add_argument(
        "--init",
        choices=["teacher", "scratch"],
        default="teacher",
        help="with --derive-width: start 'alone' and 'distilled' from the pruned teacher's weights "
        "(default) or both from the same random weights",
    )
    parser.add_argument(
        "--hint",
        nargs="*",
        default=[],
        metavar="PATH",
        help="hint (FitNets) terms between the same module path in student and teacher",
    )
    parser.add_argument(
        "--attention",
        nargs="*",
        default=[],
        metavar="PATH",
        help="attention-transfer terms between the same module path in student and teacher",
    )
    parser.add_argument("--feature-weight", type=float, default=1.0)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--temperature", type=float, default=4.0)
    parser.add_argument("--soft-weight", type=float, default=0.7)
    parser.add_argument("--hard-weight", type=float, default=0.3)
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], 2
    result = harness.start(
        args,
        title="Distillation vs training the student alone",
        name="distill" if args.derive_width is None else f"distill-derived-{args.derive_width}",
    )
    data = fashion_mnist.load()
    teacher = load_weights(MODELS["cnn_teacher"](), args.teacher).eval()
    validate = partial(evaluate_accuracy, dataset=data.val)
    cfg = TrainConfig(epochs=args.epochs, lr=args.lr, precision="auto")
    example = data.test.tensors[0][:2]
    with tempfile.TemporaryDirectory() as tmp:
        logits = teacher_cache(teacher, data.train, Path(tmp) / "teacher.safetensors")
        results = {"alone": [], "distilled": []}
        if args.derive_width is not None and args.init == "teacher":
            results = {"scratch": [], **results}
        features = [FeatureTerm(p, p, "hint", args.feature_weight) for p in args.hint] + [
            FeatureTerm(p, p, "attention", args.feature_weight) for p in args.attention
        ]
        for seed in args.seeds:
            for mode in results:
                torch.manual_seed(seed)
                student = new_student(args, teacher, example, scratch=mode == "scratch" or args.init == "scratch")
                if mode in ("alone", "scratch"):
                    fit(
                        student,
                        data.train,
                        cfg,
                        loss_fn=cross_entropy_loss(),
                        batch_size=128,
                        validate=validate,
                        seed=seed,
                    )
                else:
                    d = Distiller(
                        teacher,
                        student,
                        example,
                        args.temperature,
                        args.soft_weight,
                        args.hard_weight,
                        features=features,
                        cached_logits=logits,
                    )
                    fit(student, Indexed(data.train), cfg, loss_fn=d.loss, batch_size=128, validate=validate, seed=seed)
                    Distiller.finish(student)
                results[mode].append(evaluate_accuracy(student, data.test))
        timing = {}
        for mode in ("live", "cached"):
            torch.manual_seed(0)
            student = new_student(args, teacher, example)
            d = Distiller(
                teacher,
                student,
                example,
                args.temperature,
                args.soft_weight,
                args.hard_weight,
                cached_logits=logits if mode == "cached" else None,
            )
            start = time.perf_counter()
            fit(
                student,
                Indexed(data.train) if mode == "cached" else data.train,
                TrainConfig(epochs=1, lr=args.lr),
                loss_fn=d.loss,
                batch_size=128,
                seed=0,
            )
            timing[mode] = (time.perf_counter() - start, {k: v.clone() for k, v in student.state_dict().items()})
    teacher_acc = evaluate_accuracy(teacher, data.test)
    t_params = sum(p.numel() for p in teacher.parameters())
    s_params = sum(p.numel() for p in new_student(args, teacher, example).parameters())
    name = (
        args.student if args.derive_width is None else f"derived at width ratio {args.derive_width}, {args.init} init"
    )
    print(
        f"\nteacher cnn_teacher: {t_params:,} params, test accuracy {teacher_acc:.4f}; student {name}: "
        f"{s_params:,} params ({t_params / s_params:.1f}x fewer); {args.epochs} epochs, lr {args.lr}, "
        f"seeds {args.seeds}; "
        f"T={args.temperature}, soft {args.soft_weight}, hard {args.hard_weight}; "
        f"hints {args.hint or 'none'}, attention {args.attention or 'none'} (weight {args.feature_weight})"
    )
    for mode, accs in results.items():
        mean, sd = statistics.mean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0
        print(
            f"{mode:<10} accuracy {mean:.4f} ± {sd:.4f}  (per seed {', '.join(f'{a:.4f}' for a in accs)}); "
            f"retention {mean / teacher_acc:.2%}"
        )
    gain = statistics.mean(results["distilled"]) - statistics.mean(results["alone"])
    if "scratch" in results:
        print(
            f"distillation gain over the same architecture from scratch: "
            f"{100 * (statistics.mean(results['distilled']) - statistics.mean(results['scratch'])):+.2f} points"
        )
    print(f"distillation gain: {100 * gain:+.2f} points (mean over {len(args.seeds)} seeds)")
    (t_live, w_live), (t_cached, w_cached) = timing["live"], timing["cached"]
    diff = max(float((w_live[k] - w_cached[k]).abs().max()) for k in w_live)
    print(
        f"one epoch: teacher every step {t_live:.1f} s, cached logits {t_cached:.1f} s "
        f"({t_live / t_cached:.2f}x faster); largest weight difference {diff:.2e}"
    )
    table = result.table(
        f"Teacher cnn_teacher ({t_params:,} params, test accuracy {teacher_acc:.4f}); student {name} "
        f"({s_params:,} params); {args.epochs} epochs, lr {args.lr}, seeds {args.seeds}; "
        f"T={args.temperature}, soft {args.soft_weight}, hard {args.hard_weight}; hints "
        f"{args.hint or 'none'}, attention {args.attention or 'none'} (weight {args.feature_weight}); "
        f"test accuracy on all {len(data.test)} images",
        ["training", "mean accuracy", "standard deviation", "per seed", "retention of the teacher's"],
        [None, "{:.4f}", "{:.4f}", "{:.4f}", "{:.2%}"],
    )
    for mode, accs in results.items():
        table.add(
            mode,
            statistics.mean(accs),
            statistics.stdev(accs) if len(accs) > 1 else 0.0,
            accs,
            statistics.mean(accs) / teacher_acc,
        )
    cache = result.table(
        "One epoch with the teacher run every step vs read from the on-disk cache",
        ["teacher every step (s)", "cached logits (s)", "speedup", "largest weight difference"],
        ["{:.1f}", "{:.1f}", "{:.2f}x", "{:.2e}"],
    )
    cache.add(t_live, t_cached, t_live / t_cached, diff)
    result.headline(
        f"distillation gain over training alone (points, mean of {len(args.seeds)} seeds)", 100 * gain, "{:+.2f}"
    )
    result.headline("teacher cache: epoch speedup", t_live / t_cached, "{:.2f}x")
    result.save(echo=False)


def new_student(args, teacher, example, scratch: bool = False):
    """The built-in student, or the teacher with `--derive-width` of its channels removed (re-initialised
    at random for the 'scratch' control)."""
    if args.derive_width is None:
        return MODELS[args.student]()
    student = derive_width(teacher, example, args.derive_width)
    if scratch:
        for m in student.modules():
            if m is not student and hasattr(m, "reset_parameters"):
                m.reset_parameters()
    return student.train()


if __name__ == "__main__":
    main()
