"""Int8 for sentence encoders, fidelity first: ONNX Runtime dynamic int8 (per-channel weights) with
accuracy-driven fallback measured as cosine similarity to the float model on calibration sentences
from every text source given (the worst source decides), so no source is tuned for alone."""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx
import torch

from torchslim.export.onnx import export_inputs
from torchslim.measure.latency import ort_session
from torchslim.models.hf import cosine_fidelity, embed, tokenize
from torchslim.quantize import lower
from torchslim.train import console

NAMES = ["input_ids", "attention_mask"]
AXES = [{0: "batch", 1: "sequence"}] * 2


def ort_embed(session, tokenizer, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(sentences), batch_size):
        ids, mask = tokenize(tokenizer, sentences[i:i + batch_size])
        out.append(torch.from_numpy(session.run(None, {"input_ids": ids.numpy(),
                                                       "attention_mask": mask.numpy()})[0]))
    return torch.cat(out)


def export_encoder(model, tokenizer, path: Path, sentences: list[str]) -> Path:
    ids, mask = tokenize(tokenizer, sentences[:4])
    return export_inputs(model, path, (ids, mask), NAMES, AXES)


def _worst(path: Path, tokenizer, calibration: dict, reference: dict, threads: int) -> float:
    session = ort_session(path, threads)
    return min(cosine_fidelity(reference[k], ort_embed(session, tokenizer, s))["mean_cosine"]
               for k, s in calibration.items())


def fidelity_int8(model, tokenizer, calibration: dict[str, list[str]], dst: Path, target: float = 0.995,
                  threads: int = 2, per_channel: bool = True) -> tuple[Path, dict]:
    """Dynamic int8 of every MatMul, then the MatMuls whose int8 alone costs the most cosine go back
    to float until the worst source's mean calibration cosine reaches `target`."""
    reference = {k: embed(model, tokenizer, s) for k, s in calibration.items()}
    first = next(iter(calibration.values()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        float_onnx = export_encoder(model, tokenizer, tmp / "float.onnx", first)
        matmuls = [n.name for n in onnx.load(str(float_onnx)).graph.node if n.op_type in ("MatMul", "Gemm")
                   and any(i for i in n.input[1:])]
        lower.dynamic_int8(float_onnx, dst, per_channel)
        score = _worst(dst, tokenizer, calibration, reference, threads)
        info = {"target": target, "all_int8_cosine": score, "excluded": [], "sensitivity": []}
        if score < target:
            for name in matmuls:  # int8 of one MatMul alone
                others = [m for m in matmuls if m != name]
                lower.dynamic_int8(float_onnx, tmp / "one.onnx", per_channel, nodes_to_exclude=others)
                info["sensitivity"].append(
                    {"node": name, "loss": 1 - _worst(tmp / "one.onnx", tokenizer, calibration, reference, threads)})
            info["sensitivity"].sort(key=lambda r: -r["loss"])
            order = [r["node"] for r in info["sensitivity"]]
            while score < target and order:
                info["excluded"].append(order.pop(0))
                lower.dynamic_int8(float_onnx, dst, per_channel, nodes_to_exclude=info["excluded"])
                score = _worst(dst, tokenizer, calibration, reference, threads)
                console.log(f"int8: {len(info['excluded'])} MatMul(s) in float, worst calibration cosine {score:.4f}")
    info.update(cosine=score, int8_matmuls=len(matmuls) - len(info["excluded"]), matmuls=len(matmuls),
                summary=f"{len(matmuls) - len(info['excluded'])}/{len(matmuls)} MatMuls int8, worst-source "
                        f"calibration cosine {score:.4f} (all int8: {info['all_int8_cosine']:.4f})")
    return dst, info
