"""Tasks on labelled examples `(input, target)` from the recipe's `data` (the built-in Fashion-MNIST
or a user's `module:function`): the base of `classification` and of a user's regression, ranking or
dense-prediction task, which then only says its loss and metrics (see the README's user-task example)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from torchslim.data import build_data
from torchslim.distill.students import apply_keep_blocks
from torchslim.export.onnx import export_onnx
from torchslim.measure.predict import Inputs, Predictor, batched
from torchslim.models.io import build_model
from torchslim.models.spec import ModelSpec
from torchslim.tasks.base import Task


class LabelledTask(Task):
    """Data from `recipe.data` (a DataBundle: train / val / test splits and an InputSpec); the model
    from `recipe.model`. Subclasses give `loss`, `score` (on the validation split) and `evaluate`
    (on the test split), usually through `outputs(predict, split)`."""

    provides = frozenset({"labels"})

    def setup(self) -> nn.Module:
        self.data = build_data(self.recipe.data, self.search_dir)
        self._cache: dict = {}
        return build_model(self.recipe.model, self.data.num_classes, self.search_dir)

    def rebuild(self, architecture: dict) -> nn.Module:
        model = build_model(ModelSpec(**architecture["model"]), self.data.num_classes, self.search_dir)
        for op in architecture.get("ops", []):
            model = apply_keep_blocks(model, op["keep_blocks"], op["indices"])
        return model

    def train_set(self):
        return self.data.train

    @property
    def input_names(self) -> list[str]:
        return [self.data.input.name]

    def input_spec(self) -> dict:
        return self.data.input.to_dict()

    def export(self, model: nn.Module, path: Path, exporter: str = "dynamo", opset: int = 18) -> Path:
        return export_onnx(model.eval(), path, self.data.input, exporter, opset)

    def split(self, name: str, samples: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A whole split (`val` or `test`, at most `samples` examples) as (inputs, targets), cached."""
        key = (name, samples)
        if key not in self._cache:
            dataset = getattr(self.data, name)
            n = len(dataset) if samples is None else min(samples, len(dataset))
            xs, ys = zip(*(dataset[i] for i in range(n)))
            self._cache[key] = (torch.stack(xs), torch.stack([torch.as_tensor(y) for y in ys]))
        return self._cache[key]

    def outputs(self, predict: Predictor, split: str, samples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(outputs of `predict` on a split, its targets), in batches of data.eval_batch_size."""
        x, y = self.split(split, samples)
        return batched(predict, (x,), self.recipe.data.eval_batch_size), y.numpy()

    def example(self, n: int) -> Inputs:
        x = self.split("test")[0]
        reps = -(-n // len(x))
        return (x.repeat(reps, *([1] * (x.dim() - 1)))[:n].contiguous(),)

    def calibration(self, batches: int, batch_size: int) -> list[Inputs]:
        gen = torch.Generator().manual_seed(self.recipe.seed)
        train = self.data.train
        n = min(len(train), batches * batch_size)
        idx = torch.randperm(len(train), generator=gen)[:n].tolist()
        x = torch.stack([train[i][0] for i in idx])
        return [(x[i : i + batch_size],) for i in range(0, n, batch_size)]
