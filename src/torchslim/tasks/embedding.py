"""`task: embedding`: a Hugging Face sentence encoder such as all-MiniLM-L6-v2, judged by how closely
its embeddings follow the float model's.

- `mean_cosine` (the task metric) / `min_cosine`: cosine similarity of the served artifact's
  embeddings to the float model's on the held-out sentences of every text source — the mean of the
  worst source and the minimum over all (each source's own numbers are under `fidelity`);
- validation (early stopping, quantization fallback) is the worst source's mean cosine on the
  calibration sentences, never the evaluation ones;
- training (fine-tuning after pruning or factorising, QAT) is self-distillation: 1 - cosine to the
  float model's embeddings, on the training corpus (`text.training_corpus`, disjoint from both);
- the ONNX artifact is exported with the TorchScript exporter and fused by ONNX Runtime's transformer
  optimizer (attention, layer norms, GELU), then rewritten for CPU serving (`export.transformer`)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from torchslim.data import text
from torchslim.distill.encoder import EncoderDistillation, drop_layers, sentence_dataset, trim
from torchslim.measure.predict import Inputs, Predictor
from torchslim.models.hf import cosine_fidelity, embed, load_sentence_encoder, resolve_model_dir, tokenize
from torchslim.prune.transformer.encoder import resize_encoder
from torchslim.quantize.encoder import export_encoder
from torchslim.tasks.base import Task, register_task

NAMES = ["input_ids", "attention_mask"]
AXES = [{0: "batch", 1: "sequence"}] * 2


@register_task("embedding")
class Embedding(Task):
    metric = "mean_cosine"
    provides = frozenset({"encoder"})
    default_train_sentences = 48000
    text_model = True
    distillation = EncoderDistillation

    @classmethod
    def check_data(cls, data) -> str | None:
        unknown = [s for s in data.sources if s not in text.SOURCES]
        if unknown:
            return (
                f"data.sources: {unknown[0]!r} is not a sentence source of task embedding; choose from "
                f"{', '.join(text.SOURCES)}"
            )
        return None

    def setup(self) -> nn.Module:
        r = self.recipe
        self.teacher, self.tokenizer = load_sentence_encoder(r.model.hf)
        self.teacher.requires_grad_(False)
        splits = {s: text.split(s, r.data.calibration, r.data.evaluation, r.data.split_seed) for s in r.data.sources}
        self.calibration_sentences = {s: c for s, (c, _) in splits.items()}
        self.evaluation = {s: e for s, (_, e) in splits.items()}
        self.reference = {s: embed(self.teacher, self.tokenizer, e) for s, e in self.evaluation.items()}
        self._calibration_reference = None
        self._train = None
        return copy.deepcopy(self.teacher)

    def architecture(self) -> dict:
        return {"model": {"hf": self.recipe.model.hf}, "ops": []}

    def rebuild(self, architecture: dict) -> nn.Module:
        """The current model's structure from its architecture record (layers kept by depth reduction,
        heads and FFN neurons left by pruning)."""
        model = copy.deepcopy(self.teacher)
        for op in architecture.get("ops", []):
            if "keep_layers" in op:
                model, _ = drop_layers(model, indices=op["keep_layers"])
            else:
                resize_encoder(model, op["layer_shapes"])
        return model

    # ------------------------------------------------------------------ training and validation
    def train_set(self, sentences: int | None = None, max_length: int = 128):
        """Token ids and masks of the training corpus (data.train_subset sentences, default 48,000)."""
        n = sentences or self.recipe.data.train_subset or self.default_train_sentences
        if self._train is None or self._train[0] != (n, max_length):
            self._train = ((n, max_length), sentence_dataset(self.tokenizer, text.training_corpus(limit=n), max_length))
        return self._train[1]

    def loss(self, label_smoothing: float = 0.0):
        """Self-distillation: 1 - cosine between the model's embedding and the float model's."""
        teacher = self.teacher

        def loss_fn(model: nn.Module, batch: tuple):
            ids, mask = trim(batch[0], batch[1])
            with torch.no_grad():
                target = teacher(ids, mask).float()
            value = (1 - F.cosine_similarity(model(ids, mask), target, dim=1)).mean()
            return value, {"embedding": value}

        return loss_fn

    def score(self, predict: Predictor, samples: int | None = None) -> float:
        """Worst source's mean cosine to the float model on the calibration sentences."""
        if self._calibration_reference is None:
            self._calibration_reference = {
                k: embed(self.teacher, self.tokenizer, s) for k, s in self.calibration_sentences.items()
            }
        return min(
            cosine_fidelity(self._calibration_reference[k], self._embed(predict, s[:samples]))["mean_cosine"]
            for k, s in self.calibration_sentences.items()
        )

    def evaluate(self, predict: Predictor) -> dict:
        served = {k: self._embed(predict, s) for k, s in self.evaluation.items()}
        fidelity = {k: cosine_fidelity(self.reference[k], served[k]) for k in served}
        return {
            "fidelity": fidelity,
            "mean_cosine": min(f["mean_cosine"] for f in fidelity.values()),
            "min_cosine": min(f["min_cosine"] for f in fidelity.values()),
            "eval_examples": sum(len(s) for s in self.evaluation.values()),
        }

    def _embed(self, predict: Predictor, sentences: list[str], batch_size: int = 64) -> torch.Tensor:
        out = [
            predict(*tokenize(self.tokenizer, sentences[i : i + batch_size]))
            for i in range(0, len(sentences), batch_size)
        ]
        return torch.from_numpy(np.concatenate(out)).float()

    # ------------------------------------------------------------------ inputs
    def _first(self) -> list[str]:
        return self.evaluation[next(iter(self.evaluation))]

    def sentences_input(self, sentences: list[str]) -> Inputs:
        return tokenize(self.tokenizer, sentences)

    def example(self, n: int) -> Inputs:
        """`n` held-out sentences of the first source, padded to the longest."""
        sentences = self._first()
        return self.sentences_input((sentences * (n // len(sentences) + 1))[:n])

    def calibration(self, batches: int, batch_size: int) -> list[Inputs]:
        """The calibration sentences of every source, in batches (at most `batches` per source)."""
        return [
            self.sentences_input(s[i : i + batch_size])
            for s in self.calibration_sentences.values()
            for i in range(0, min(len(s), batches * batch_size), batch_size)
        ]

    # ------------------------------------------------------------------ the served artifact
    @property
    def input_names(self) -> list[str]:
        return NAMES

    def dynamic_axes(self) -> list[dict[int, str]]:
        return AXES

    def export(
        self,
        model: nn.Module,
        path: Path,
        exporter: str = "dynamo",
        opset: int = 18,
        fuse: bool = True,
        pad_free: bool = True,
    ) -> Path:
        """Fused for ONNX Runtime (the TorchScript exporter, whose graph its transformer optimizer
        recognises) with the CPU serving rewrites; `fuse=False`: the plain export."""
        return export_encoder(model.eval(), self.tokenizer, path, self._first(), fuse=fuse, pad_free=pad_free)

    def input_spec(self) -> dict:
        return {
            "names": NAMES,
            "dynamic_axes": [{str(k): v for k, v in a.items()} for a in AXES],
            "dtype": "int64",
            "tokenizer": str(resolve_model_dir(self.recipe.model.hf)),
            "max_length": 128,
            "output": "sentence embedding: mean of the token vectors over the attention mask, L2-normalised",
        }

    def comparison_feeds(self) -> dict[str, dict]:
        """{label: ONNX Runtime feed}: one sentence, and for every larger batch size the same number of
        held-out sentences in random order (padded to the longest) and sorted by length (little padding),
        so every speedup is stated for the shape it holds for."""
        cfg = self.recipe.measure
        sentences = self._first()
        by_length = sorted(sentences, key=lambda s: len(self.tokenizer(s)["input_ids"]))
        feeds = {}
        for n in cfg.compare_batch_sizes or sorted({1, cfg.batch_size}):
            chosen = (sentences * (n // len(sentences) + 1))[:n]
            if n == 1:
                feeds["batch 1"] = self.feed(self.sentences_input(chosen))
                continue
            mixed = self.feed(self.sentences_input(chosen))
            feeds[f"batch {n}, random order ({float(mixed['attention_mask'].mean()):.0%} real tokens)"] = mixed
            mid = max(0, len(by_length) // 2 - n // 2)
            ordered = self.feed(self.sentences_input((by_length[mid:] + by_length)[:n]))
            feeds[f"batch {n}, length-sorted ({float(ordered['attention_mask'].mean()):.0%} real tokens)"] = ordered
        return feeds

    def describe(self, metrics: dict) -> str:
        return f"mean cosine {metrics['mean_cosine']:.4f} (min {metrics['min_cosine']:.4f}), "
