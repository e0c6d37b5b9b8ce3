"""`task: classification`: logits over classes; accuracy (from the served runtime's outputs) is the
task metric, cross-entropy the training loss."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from torchslim.data.checks import check_labels
from torchslim.errors import DataError
from torchslim.measure.predict import Predictor
from torchslim.tasks.base import register_task
from torchslim.tasks.labelled import LabelledTask
from torchslim.train import cross_entropy_loss, evaluate_accuracy


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    logits_t = torch.from_numpy(np.asarray(logits, dtype=np.float32))
    labels_t = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return {
        "accuracy": float((logits_t.argmax(1) == labels_t).float().mean()),
        "loss": float(torch.nn.functional.cross_entropy(logits_t, labels_t)),
    }


@register_task("classification")
class Classification(LabelledTask):
    metric = "accuracy"
    provides = frozenset({"labels", "classifier"})

    def check(self, model: nn.Module) -> None:
        super().check(model)
        classes = self.data.num_classes
        with torch.inference_mode():
            out = model.eval()(*self.example(2))
        if classes and (out.dim() != 2 or out.shape[1] != classes):
            raise DataError(
                f"The model returns shape {list(out.shape)} but the data has {classes} classes; "
                f"a classifier must return [batch, {classes}]."
            )
        if out.dim() != 2:
            raise DataError(
                f"The model returns shape {list(out.shape)}; a classifier returns [batch, classes] (one score "
                "per class)."
            )
        for split in ("train", "val", "test"):
            check_labels(getattr(self.data, split), split, out.shape[1])

    def loss(self, label_smoothing: float = 0.0):
        return cross_entropy_loss(label_smoothing)

    def validate(self, model: nn.Module) -> float:
        return evaluate_accuracy(
            model, self.data.val, self.recipe.data.eval_batch_size, next(model.parameters()).device
        )

    def score(self, predict: Predictor, samples: int | None = None) -> float:
        out, y = self.outputs(predict, "val", samples)
        return float((out.argmax(1) == y).mean())

    def evaluate(self, predict: Predictor) -> dict:
        out, y = self.outputs(predict, "test")
        return {**classification_metrics(out, y), "eval_examples": len(y)}

    def agreement(self, reference: np.ndarray, lowered: np.ndarray) -> dict:
        return top1_agreement(reference, lowered)


def top1_agreement(reference: np.ndarray, lowered: np.ndarray) -> dict:
    return {"float_top1_agreement": float((lowered.argmax(1) == reference.argmax(1)).mean())}
