"""Depth pruning of a causal LM without healing: which blocks to remove, chosen by block influence
(ShortGPT: one minus the cosine between a block's input and output) or greedily by the loss on
calibration text (`prune: {method: blocks, score: loss}`), each with and without a linear bridge
(`bridge: linear`, a least-squares map folded into the block before each removed run), side by side
on the held-out sources.

    .venv/bin/python bench/llm_depth.py                              # bench/recipes/smollm2-depth25.yaml
    .venv/bin/python bench/llm_depth.py --loss-batches 2 --remove 6

The recipe gives the model, the text and the calibration windows (batches of 4 windows of
`data.window` tokens); influence uses --influence-batches of them, the greedy loss --loss-batches
(one forward pass per candidate: 30 + 8 per further block). Perplexity in PyTorch over the recipe's
held-out tokens, windows of data.window, no overlap."""

from __future__ import annotations

import copy
import time

import torch

import harness
from torchslim.measure.lm import score
from torchslim.models.transformer import transformer_blocks
from torchslim.prune.transformer.depth import (
    block_influence,
    keep_blocks,
    least_influential,
    least_loss,
    linear_bridges,
)
from torchslim.recipe import load_recipe
from torchslim.tasks import make_task


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--recipe", default="bench/recipes/smollm2-depth25.yaml")
    parser.add_argument("--remove", type=int, default=None, help="blocks to remove (default: the recipe's ratio)")
    parser.add_argument("--influence-batches", type=int, default=16)
    parser.add_argument("--loss-batches", type=int, default=1)
    parser.add_argument(
        "--bridge-batches",
        type=int,
        default=16,
        help="batches a linear bridge is fitted on (each choice is also measured with `bridge: linear`; 0: not)",
    )
    args = parser.parse_args()
    result = harness.start(
        args, title="Depth pruning of a causal LM without healing: which blocks to remove", code=[args.recipe]
    )
    torch.set_num_threads(args.threads)
    recipe, _ = load_recipe(args.recipe)
    task = make_task(recipe, None)
    model = task.setup().eval()
    total = len(transformer_blocks(model))
    ratio = next((s.config.ratio for s in recipe.stages if s.name == "prune"), 0.25)
    count = args.remove if args.remove is not None else int(round(ratio * total))
    print(f"{recipe.model.hf}; {args.threads} threads; removing {count} of {total} blocks")
    batches = task.calibration(max(args.influence_batches, args.loss_batches, args.bridge_batches), 4)
    choices = {}
    t = time.time()
    choices["influence"] = least_influential(block_influence(model, batches[: args.influence_batches]), count)
    print(f"influence: {choices['influence']} ({time.time() - t:.0f} s)", flush=True)
    t = time.time()
    choices["loss"], record = least_loss(model, batches[: args.loss_batches], count, task.loss())
    print(
        f"loss: {choices['loss']} ({time.time() - t:.0f} s; greedy losses "
        f"{[round(s['loss'], 3) for s in record['steps']]}, unpruned {record['loss']:.3f})",
        flush=True,
    )
    window = recipe.data.window

    def perplexities(m):
        with torch.no_grad():
            return {
                s: score(lambda ids: m(ids, torch.ones_like(ids)), ids, None, window, window)["perplexity"]
                for s, ids in task.evaluation.items()
            }

    rows = {"unpruned": perplexities(model)}
    for name, remove in choices.items():
        pruned = keep_blocks(copy.deepcopy(model), [i for i in range(total) if i not in remove])
        rows[f"{name} {remove}"] = perplexities(pruned)
        if args.bridge_batches:
            bridged = copy.deepcopy(model)
            t = time.time()
            fits = linear_bridges(bridged, batches[: args.bridge_batches], remove)
            print(f"{name}: linear bridges {fits} ({time.time() - t:.0f} s)", flush=True)
            rows[f"{name} {remove}, linear bridge"] = perplexities(
                keep_blocks(bridged, [i for i in range(total) if i not in remove])
            )
    print("\n| blocks removed | " + " | ".join(f"{s} perplexity" for s in task.evaluation) + " |")
    print("|---|" + "---|" * len(task.evaluation))
    for name, ppl in rows.items():
        print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in ppl.values()) + " |")
    table = result.table(
        f"{recipe.model.hf}: {count} of {total} blocks removed, no healing; perplexity in PyTorch "
        f"over the recipe's held-out tokens (windows of {window})",
        ["blocks removed"] + [f"{s} perplexity" for s in task.evaluation],
        [None] + ["{:.2f}"] * len(task.evaluation),
    )
    for name, ppl in rows.items():
        table.add(name, *ppl.values())
    first = next(iter(task.evaluation))
    best = min((n for n in rows if n != "unpruned"), key=lambda n: rows[n][first])
    result.headline(f"{first}: best choice ({best}) perplexity", rows[best][first], "{:.2f}")
    result.headline(f"{first}: unpruned perplexity", rows["unpruned"][first], "{:.2f}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
