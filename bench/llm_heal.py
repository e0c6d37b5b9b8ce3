"""Healing settings side by side at one small budget: a depth-pruned causal LM healed by distillation
from the float model with each variant (learning rate, batch size, the hidden-state term), then the
validation perplexity after each slice and the perplexity on the held-out sources.

    .venv/bin/python bench/llm_heal.py                 # bench/recipes/smollm2-depth25.yaml's text, 24,576 tokens
    .venv/bin/python bench/llm_heal.py --remove 5 12 13 14 15 16 17 18 \\
        --variants '{"bs4": {"lr": 2e-4}, "bs1": {"lr": 2e-4, "batch_size": 1}}'

Every variant starts from the same pruned model (the blocks in --remove taken out), trains on the
same --tokens of training text in --slices slices (the distill stage's loss and training loop, seed
0), and is scored in PyTorch on the recipe's held-out tokens (windows of data.window, no overlap).
Variant keys: lr, batch_size, hidden_weight, schedule."""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from torchslim.cpu import cpu_features
from torchslim.distill.lm_stage import LMDistillConfig, Slices, _Hidden, distillation_loss
from torchslim.measure.lm import score
from torchslim.prune.depth import _blocks, keep_blocks
from torchslim.recipe import load_recipe
from torchslim.report.json import _cpu_name
from torchslim.tasks import make_task
from torchslim.train import TrainConfig, fit

VARIANTS = {"lr 2e-4, batch 4": {"lr": 2e-4}, "lr 1e-3, batch 4": {"lr": 1e-3},
            "lr 1e-3, batch 1": {"lr": 1e-3, "batch_size": 1},
            "lr 1e-3, batch 4, hidden_weight 1": {"lr": 1e-3, "hidden_weight": 1.0},
            "lr 2e-4, batch 1": {"lr": 2e-4, "batch_size": 1}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="bench/recipes/smollm2-depth25.yaml")
    parser.add_argument("--remove", nargs="*", type=int, default=[12, 13, 14, 15, 16, 17, 25, 26])
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--variants", default=None, help="JSON {name: {lr, batch_size, hidden_weight, schedule}}")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe, _ = load_recipe(args.recipe)
    task = make_task(recipe, None)
    base = task.setup().eval()
    total = len(_blocks(base))
    keep = [i for i in range(total) if i not in set(args.remove)]
    keep_blocks(base, keep)
    window = recipe.data.window
    windows = task.healing_windows(args.tokens, window)
    print(f"CPU: {_cpu_name()} ({' '.join(cpu_features())}); {recipe.model.hf}; {args.threads} threads; blocks "
          f"{sorted(args.remove)} of {total} removed; {len(windows) * window:,} healing tokens in {args.slices} slices")
    print("\n| variant | validation perplexity after each slice | " +
          " | ".join(f"{s} perplexity" for s in task.evaluation) + " | seconds |")
    print("|---|---|" + "---|" * (len(task.evaluation) + 1))

    def held_out(model) -> str:
        predict = task._logits(lambda ids, mask: model(ids, mask).numpy())
        return " | ".join(f"{score(predict, ids, None, window, window, bos=task.bos)['perplexity']:.2f}"
                          for ids in task.evaluation.values())
    print(f"| none | {-task.validate(base):.2f} | {held_out(base)} | |", flush=True)
    for name, v in (json.loads(args.variants) if args.variants else VARIANTS).items():
        model = copy.deepcopy(base).requires_grad_(True)
        cfg = LMDistillConfig(hidden_weight=v.get("hidden_weight", 0.0), train=TrainConfig(
            epochs=args.slices, lr=v["lr"], batch_size=v.get("batch_size", 4), precision="auto", grad_clip=1.0,
            weight_decay=0.0, schedule=v.get("schedule", "cosine")))
        slices = Slices(windows, args.slices)
        pairs, student, teacher = [], None, None
        if cfg.hidden_weight:
            pairs = list(enumerate(keep))
            student, teacher = _Hidden(_blocks(model), [s for s, _ in pairs]), _Hidden(_blocks(task.reference), keep)
        start = time.time()
        try:
            result = fit(model, slices, cfg.train, loss_fn=distillation_loss(task.reference, cfg, student, teacher, pairs),
                         batch_size=cfg.train.batch_size, validate=task.validate, seed=0,
                         epoch_setup=lambda m, epoch: setattr(slices, "epoch", epoch), description=name)
        finally:
            for hooks in (student, teacher):
                if hooks is not None:
                    hooks.remove()
        seconds = time.time() - start
        model.eval()
        curve = ", ".join(f"{-h['val_metric']:.2f}" for h in result.history if "val_metric" in h)
        print(f"| {name} | {curve} | {held_out(model)} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
