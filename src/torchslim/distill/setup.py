"""What one task's distillation differs in: a `DistillSetup` subclass, named by the task
(`Task.distillation`), says the teacher, the student, the output term, the feature terms by module
path, the training set and the report; the one `distill` stage (`torchslim.distill.stage`) builds the
loss from them, runs the one training loop and returns the setup's result.

Built-in setups: `logits.LogitDistillation` (a classifier: KD on logits, a student built or derived
from the teacher), `encoder.EncoderDistillation` (a sentence encoder: layers dropped, embeddings and
hidden states) and `lm.LMDistillation` (a causal language model healed from its float reference)."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import BaseModel
from torch import nn
from torch.utils.data import Dataset

from torchslim.distill.distiller import FeatureTerm, OutputTerm
from torchslim.results import StageResult
from torchslim.train import TrainResult


class DistillSetup:
    """Constructed as `Setup(model, cfg, ctx)` (the current model, the task's stage settings, the run
    context), it sets the attributes below; the stage then trains `student` on
    `output + sum(feature terms)` and asks `result` for the stage's typed result."""

    config: ClassVar[type[BaseModel]]  # the stage's settings for this task (its recipe keys)
    summary: ClassVar[str] = ""  # one line for the recipe reference and `torchslim validate`
    description: ClassVar[str] = "distill"  # the training loop's label
    checkpoint: ClassVar[str] = "ckpt"  # the folder of epoch checkpoints in the stage's folder

    teacher: nn.Module
    student: nn.Module
    output: OutputTerm
    features: list[FeatureTerm]
    example: torch.Tensor | None = None  # an input sizing the hint adapters (None: no adapters)

    def train_set(self) -> Dataset:
        raise NotImplementedError

    def resumed(self) -> bool:
        """True when a resumed run found the finished student and loaded it: no training."""
        return False

    def epoch_setup(self, model: nn.Module, epoch: int) -> None:
        """Runs before every epoch (in training mode)."""

    def stop(self) -> bool:
        """True after an epoch ends training there (a time budget)."""
        return False

    def result(self, trained: TrainResult | None) -> StageResult:
        """The stage's result from the training (None when `resumed`)."""
        raise NotImplementedError
