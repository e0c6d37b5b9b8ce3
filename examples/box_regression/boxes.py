"""A task of your own, end to end: regress where a bright box sits in a noisy 32x32 image and how big
it is (centre x, centre y, side, each in [0, 1]). It shows the three things a user adds:

- `BoxRegression`, a `torchslim.tasks.LabelledTask` with its loss (smooth L1) and metric (mean
  absolute error, lower is better), named in the recipe as `task: {entrypoint: "boxes:BoxRegression"}`;
- `build` and `data`, the model and data entry points every recipe uses;
- `clip_outliers`, a stage of your own (`@register_stage`), found because the recipe lists this module
  under `plugins:`.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from torch.utils.data import TensorDataset

from torchslim.registry import register_stage
from torchslim.results import StageResult
from torchslim.tasks import LabelledTask


def _boxes(n: int, seed: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    side = torch.randint(6, 17, (n,), generator=gen)
    x0 = (torch.rand(n, generator=gen) * (32 - side)).long()
    y0 = (torch.rand(n, generator=gen) * (32 - side)).long()
    images = 0.3 * torch.randn(n, 1, 32, 32, generator=gen)
    rows, cols = torch.arange(32)[None, :, None], torch.arange(32)[None, None, :]
    inside = (
        (rows >= y0[:, None, None])
        & (rows < (y0 + side)[:, None, None])
        & (cols >= x0[:, None, None])
        & (cols < (x0 + side)[:, None, None])
    )
    images[:, 0] += inside.float()
    target = torch.stack([(x0 + side / 2) / 32, (y0 + side / 2) / 32, side / 32], 1).float()
    return TensorDataset(images, target)


def data(train: int = 4000, test: int = 1000):
    """The data entry point: train / val / test splits of synthetic box images (seeded)."""
    return {
        "train": _boxes(train, 0),
        "val": _boxes(test, 1),
        "test": _boxes(test, 2),
        "description": "synthetic 32x32 images of one bright box in noise; targets: centre x, centre y, side",
    }


def build(width: int = 32) -> nn.Module:
    """The model entry point: a small CNN with three outputs."""

    def block(cin, cout):
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2)
        )

    return nn.Sequential(
        block(1, width),
        block(width, 2 * width),
        block(2 * width, 2 * width),
        nn.Flatten(),
        nn.Linear(2 * width * 16, 3),
    )


class BoxRegression(LabelledTask):
    """Box centre and size regression: smooth-L1 training loss, mean absolute error as the metric."""

    name = "box_regression"
    metric = "mae"
    higher_is_better = False

    def loss(self, label_smoothing: float = 0.0):
        def loss_fn(model, batch):
            x, y = batch
            value = F.smooth_l1_loss(model(x), y, beta=0.05)
            return value, {"smooth_l1": value}

        return loss_fn

    def score(self, predict, samples=None) -> float:
        out, y = self.outputs(predict, "val", samples)
        return -float(np.abs(out - y).mean())  # larger is better for early stopping and fallback

    def evaluate(self, predict) -> dict:
        out, y = self.outputs(predict, "test")
        return {
            "mae": float(np.abs(out - y).mean()),
            "rmse": float(np.sqrt(((out - y) ** 2).mean())),
            "eval_examples": len(y),
        }


class ClipConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    sigmas: float = Field(
        4.0,
        gt=0,
        description="weights beyond this many standard deviations of their layer are clipped (narrower int8 ranges)",
    )


@register_stage("clip_outliers", ClipConfig)
def clip_outliers(model, cfg: ClipConfig, ctx):
    """Clip every conv / linear weight to +-sigmas standard deviations of its layer."""
    clipped = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                w = module.weight
                bound = cfg.sigmas * float(w.std())
                clipped += int((w.abs() > bound).sum())
                w.clamp_(-bound, bound)
    return StageResult(model, {"clipped_weights": clipped})  # merged into the stage's report entry
