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

import copy
import json
import time

import torch

import harness
from torchslim.distill.lm import LMDistillConfig, LMDistiller, Slices
from torchslim.measure.lm import score
from torchslim.models.transformer import transformer_blocks
from torchslim.prune.transformer.depth import keep_blocks
from torchslim.recipe import load_recipe
from torchslim.tasks import make_task
from torchslim.train import TrainConfig, fit

VARIANTS = {
    "lr 2e-4, batch 4": {"lr": 2e-4},
    "lr 1e-3, batch 4": {"lr": 1e-3},
    "lr 1e-3, batch 1": {"lr": 1e-3, "batch_size": 1},
    "lr 1e-3, batch 4, hidden_weight 1": {"lr": 1e-3, "hidden_weight": 1.0},
    "lr 2e-4, batch 1": {"lr": 2e-4, "batch_size": 1},
}


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--recipe", default="bench/recipes/smollm2-depth25.yaml")
    parser.add_argument("--remove", nargs="*", type=int, default=[12, 13, 14, 15, 16, 17, 25, 26])
    parser.add_argument("--tokens", type=int, default=24576)
    parser.add_argument("--slices", type=int, default=2)
    parser.add_argument("--variants", default=None, help="JSON {name: {lr, batch_size, hidden_weight, schedule}}")
    args = parser.parse_args()
    bench = harness.start(args, title="Healing settings for a depth-pruned causal LM", code=[args.recipe])
    torch.set_num_threads(args.threads)
    recipe, _ = load_recipe(args.recipe)
    task = make_task(recipe, None)
    base = task.setup().eval()
    total = len(transformer_blocks(base))
    keep = [i for i in range(total) if i not in set(args.remove)]
    keep_blocks(base, keep)
    window = recipe.data.window
    windows = task.healing_windows(args.tokens, window)
    print(
        f"{recipe.model.hf}; {args.threads} threads; blocks "
        f"{sorted(args.remove)} of {total} removed; {len(windows) * window:,} healing tokens in {args.slices} slices"
    )
    print(
        "\n| variant | validation perplexity after each slice | "
        + " | ".join(f"{s} perplexity" for s in task.evaluation)
        + " | seconds |"
    )
    print("|---|---|" + "---|" * (len(task.evaluation) + 1))

    table = bench.table(
        f"{recipe.model.hf}, blocks {sorted(args.remove)} of {total} removed; "
        f"{len(windows) * window:,} healing tokens in {args.slices} slices; perplexity in PyTorch on "
        f"the recipe's held-out tokens (windows of {window})",
        ["variant", "validation perplexity after each slice"]
        + [f"{s} perplexity" for s in task.evaluation]
        + ["seconds"],
        [None, "{:.2f}"] + ["{:.2f}"] * len(task.evaluation) + ["{:.0f}"],
    )

    def held_out_values(model) -> list[float]:
        predict = task._logits(lambda ids, mask: model(ids, mask).numpy())
        return [
            score(predict, ids, None, window, window, bos=task.bos)["perplexity"] for ids in task.evaluation.values()
        ]

    def held_out(values: list[float]) -> str:
        return " | ".join(f"{v:.2f}" for v in values)

    unhealed = held_out_values(base)
    print(f"| none | {-task.validate(base):.2f} | {held_out(unhealed)} | |", flush=True)
    table.add("none", [-task.validate(base)], *unhealed, None)
    healed = {}
    for name, v in (json.loads(args.variants) if args.variants else VARIANTS).items():
        model = copy.deepcopy(base).requires_grad_(True)
        cfg = LMDistillConfig(
            hidden_weight=v.get("hidden_weight", 0.0),
            train=TrainConfig(
                epochs=args.slices,
                lr=v["lr"],
                batch_size=v.get("batch_size", 4),
                precision="auto",
                grad_clip=1.0,
                weight_decay=0.0,
                schedule=v.get("schedule", "cosine"),
            ),
        )
        slices = Slices(windows, args.slices)
        start = time.time()
        result = fit(
            model,
            slices,
            cfg.train,
            loss_fn=LMDistiller(task.reference, model, cfg, keep).loss,
            batch_size=cfg.train.batch_size,
            validate=task.validate,
            seed=0,
            epoch_setup=lambda m, epoch: setattr(slices, "epoch", epoch),
            description=name,
        )
        seconds = time.time() - start
        model.eval()
        curve = ", ".join(f"{-h['val_metric']:.2f}" for h in result.history if "val_metric" in h)
        values = held_out_values(model)
        print(f"| {name} | {curve} | {held_out(values)} | {seconds:.0f} |", flush=True)
        table.add(name, [-h["val_metric"] for h in result.history if "val_metric" in h], *values, seconds)
        healed[name] = values
    first = next(iter(task.evaluation))
    best = min(healed, key=lambda n: healed[n][0])
    bench.headline(f"{first}: best healing ({best}) perplexity", healed[best][0], "{:.2f}")
    bench.headline(f"{first}: unhealed perplexity", unhealed[0], "{:.2f}")
    bench.save(echo=False)


if __name__ == "__main__":
    main()
