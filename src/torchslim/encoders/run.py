"""The run of a `task: embedding` recipe: same run directory, state.json, resume, stage entries and
report.json contract as a classifier's run; the task metric is `mean_cosine`.

Measured after every stage, for the runtime that serves the model (`measure.runtime`):
- `mean_cosine` / `min_cosine`: cosine similarity of the served artifact's embeddings to the float
  model's on the held-out sentences — the mean of the worst source and the minimum over all (each
  source's own numbers are under `fidelity`);
- bytes of the artifact on disk, parameters, latency p50/p95/p99 on a batch of `measure.batch_size`
  real sentences with `measure.threads` threads (PyTorch for float models, ONNX Runtime always).
The float ONNX export is fused by ONNX Runtime's transformer optimizer and checked against PyTorch."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from torchslim.data import text
from torchslim.errors import ExportError
from torchslim.measure.kernels import kernel_counts
from torchslim.measure.latency import onnxruntime_latency, ort_session, pytorch_latency
from torchslim.measure.model_stats import count_params
from torchslim.models.hf import cosine_fidelity, embed, load_sentence_encoder, resolve_model_dir, tokenize
from torchslim.models.io import load_weights, save_weights
from torchslim.quantize.encoder import AXES, NAMES, export_encoder, ort_embed
from torchslim.train import console

METRIC = "mean_cosine"


@dataclass
class EncoderContext:
    recipe: "object"
    run_dir: Path
    teacher: nn.Module  # the float model as loaded; fidelity is always measured against it
    tokenizer: object
    calibration: dict[str, list[str]]
    evaluation: dict[str, list[str]]
    reference: dict[str, torch.Tensor]  # the teacher's embeddings of the evaluation sentences
    resume: bool = False
    on_epoch_end: Callable | None = None
    stage_dir: Path | None = None
    stage_info: dict = field(default_factory=dict)
    architecture: dict = field(default_factory=dict)
    artifact_onnx: Path | None = None
    onnx_path: Path | None = None
    _calibration_reference: dict | None = None

    def calibration_fidelity(self, model: nn.Module) -> float:
        """Worst source's mean cosine to the float model on the calibration sentences (never the
        evaluation ones)."""
        if self._calibration_reference is None:
            self._calibration_reference = {k: embed(self.teacher, self.tokenizer, s)
                                           for k, s in self.calibration.items()}
        return min(cosine_fidelity(self._calibration_reference[k], embed(model.eval(), self.tokenizer, s))["mean_cosine"]
                   for k, s in self.calibration.items())

    def fit(self, model, train_set, cfg, loss_fn, *, checkpoint_dir: Path, description: str):
        from torchslim.train import fit
        return fit(model, train_set, cfg, loss_fn=loss_fn, batch_size=cfg.batch_size or self.recipe.data.batch_size,
                   validate=self.calibration_fidelity, checkpoint_dir=checkpoint_dir,
                   resume=self.resume, seed=self.recipe.seed, on_epoch_end=self.on_epoch_end,
                   description=description)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`measure.batch_size` real evaluation sentences of the first source, padded to the longest."""
        sentences = self.evaluation[next(iter(self.evaluation))]
        n = self.recipe.measure.batch_size
        return tokenize(self.tokenizer, (sentences * (n // len(sentences) + 1))[:n])


    def comparison_feeds(self) -> dict[str, dict]:
        """{label: ONNX Runtime feed}: one sentence, and for every larger batch size the same number of
        held-out sentences in random order (padded to the longest) and sorted by length (little padding),
        so every speedup is stated for the shape it holds for."""
        cfg = self.recipe.measure
        sentences = self.evaluation[next(iter(self.evaluation))]
        by_length = sorted(sentences, key=lambda s: len(self.tokenizer(s)["input_ids"]))
        feeds = {}
        for n in cfg.compare_batch_sizes or sorted({1, cfg.batch_size}):
            chosen = (sentences * (n // len(sentences) + 1))[:n]
            if n == 1:
                feeds["batch 1"] = self._feed(chosen)
                continue
            mixed = self._feed(chosen)
            real = float(mixed["attention_mask"].mean())
            feeds[f"batch {n}, random order ({real:.0%} real tokens)"] = mixed
            mid = max(0, len(by_length) // 2 - n // 2)
            window = (by_length[mid:] + by_length)[:n]
            ordered = self._feed(window)
            feeds[f"batch {n}, length-sorted ({float(ordered['attention_mask'].mean()):.0%} real tokens)"] = ordered
        return feeds

    def _feed(self, sentences: list[str]) -> dict:
        ids, mask = tokenize(self.tokenizer, sentences)
        return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def input_spec(recipe) -> dict:
    return {"names": NAMES, "dynamic_axes": [{str(k): v for k, v in a.items()} for a in AXES], "dtype": "int64",
            "tokenizer": str(resolve_model_dir(recipe.model.hf)), "max_length": 128,
            "output": "sentence embedding: mean of the token vectors over the attention mask, L2-normalised"}


def measure_encoder(model: nn.Module, ctx: EncoderContext, out_dir: Path) -> tuple[dict, Path]:
    cfg = ctx.recipe.measure
    model = model.eval()
    weights = out_dir / "model.safetensors"
    metrics: dict = {**count_params(model), "weights_bytes": save_weights(model, weights).stat().st_size}
    ids, mask = ctx.batch()
    quantized = ctx.artifact_onnx is not None
    latency = {} if quantized else {"pytorch": pytorch_latency(model, (ids, mask), cfg.threads, cfg.warmup,
                                                               cfg.repeats)}
    first = ctx.evaluation[next(iter(ctx.evaluation))]
    onnx_path = ctx.onnx_path or ctx.artifact_onnx or export_encoder(model, ctx.tokenizer, out_dir / "model.onnx",
                                                                     first, fuse=True)
    session = ort_session(onnx_path, cfg.threads)
    if not quantized:
        probe = first[:cfg.verify_samples]
        diff = float((embed(model, ctx.tokenizer, probe) - ort_embed(session, ctx.tokenizer, probe)).abs().max())
        if not diff <= cfg.tolerance:
            raise ExportError(f"The ONNX encoder disagrees with PyTorch: max abs difference {diff:.3g} on "
                              f"{len(probe)} sentences exceeds measure.tolerance {cfg.tolerance:g}.")
        metrics["onnx_max_abs_diff"] = diff
    latency["onnxruntime"] = onnxruntime_latency(onnx_path, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                                                 cfg.threads, cfg.warmup, cfg.repeats, session)
    if cfg.runtime == "onnxruntime":
        served = {k: ort_embed(session, ctx.tokenizer, s) for k, s in ctx.evaluation.items()}
        artifact = onnx_path
    else:
        served = {k: embed(model, ctx.tokenizer, s) for k, s in ctx.evaluation.items()}
        artifact = weights
    metrics["fidelity"] = {k: cosine_fidelity(ctx.reference[k], served[k]) for k in served}
    metrics[METRIC] = min(f["mean_cosine"] for f in metrics["fidelity"].values())
    metrics["min_cosine"] = min(f["min_cosine"] for f in metrics["fidelity"].values())
    metrics["onnx_bytes"] = onnx_path.stat().st_size
    metrics["kernels"] = kernel_counts(onnx_path, cfg.threads)  # what ONNX Runtime really runs here
    metrics["size_bytes"] = artifact.stat().st_size
    metrics["storage_bytes"] = min(metrics["weights_bytes"], metrics["size_bytes"])
    metrics["latency_ms"], metrics["latency"] = latency[cfg.runtime], latency
    metrics["eval_examples"] = sum(len(s) for s in ctx.evaluation.values())
    return metrics, artifact


def rebuild(teacher: nn.Module, architecture: dict) -> nn.Module:
    """The current model's structure from its architecture record (layers kept by depth reduction,
    heads and FFN neurons left by pruning)."""
    from torchslim.distill.encoder import drop_layers
    from torchslim.prune.encoder import resize_encoder
    model = copy.deepcopy(teacher)
    for op in architecture.get("ops", []):
        if "keep_layers" in op:
            model, _ = drop_layers(model, indices=op["keep_layers"])
        else:
            resize_encoder(model, op["layer_shapes"])
    return model


def run_embedding(recipe, run_dir: Path, state: dict | None, *, resume: bool,
                  on_epoch_end: Callable | None = None) -> dict:
    """An embedding recipe in a readied run directory (`state`: what a resumed run has done)."""
    from torchslim.pipeline import run_stages
    torch.manual_seed(recipe.seed)
    teacher, tokenizer = load_sentence_encoder(recipe.model.hf)
    teacher.requires_grad_(False)
    splits = {s: text.split(s, recipe.data.calibration, recipe.data.evaluation, recipe.data.split_seed)
              for s in recipe.data.sources}
    evaluation = {s: e for s, (_, e) in splits.items()}
    ctx = EncoderContext(recipe, run_dir, teacher, tokenizer, {s: c for s, (c, _) in splits.items()}, evaluation,
                         {s: embed(teacher, tokenizer, e) for s, e in evaluation.items()}, resume=resume,
                         on_epoch_end=on_epoch_end, architecture={"model": {"hf": recipe.model.hf}, "ops": []})
    model = copy.deepcopy(teacher)
    entries: list[dict] = list(state["stages"]) if state else []
    if entries:
        changed = [e["architecture"] for e in entries if "architecture" in e]
        if changed:
            ctx.architecture = changed[-1]
            model = rebuild(teacher, changed[-1])
        load_weights(model, run_dir / Path(entries[-1]["dir"]) / "model.safetensors")
        if any("encoder_int8" in e for e in entries):
            ctx.artifact_onnx = run_dir / entries[-1]["artifact"]
        console.log(f"resuming {run_dir}: {len(entries)} stage(s) done, continuing with stage {len(entries)}")
    return run_stages(recipe, run_dir, ctx, model, entries, lambda m, c: measure_encoder(m, c, c.stage_dir),
                      _log, input_spec(recipe), METRIC)


def _log(name: str, metrics: dict) -> None:
    lat = metrics["latency_ms"]
    console.log(f"{name}: mean cosine {metrics[METRIC]:.4f} (min {metrics['min_cosine']:.4f}), size "
                f"{metrics['size_bytes'] / 1e6:.2f} MB, params {metrics['params']:,}, latency p50 {lat['p50']:.2f} "
                f"ms ({lat['runtime']}, batch {lat['batch_size']}, {lat['threads']} threads)")
