"""A causal language model's distillation (the `distill` stage on `task: causal_lm`): healing a
pruned (or otherwise changed) language model by distillation from the float reference model on
training text the evaluation never sees.

The student is the current model; the teacher is the task's float reference. The loss is the KL
divergence of the next-token distributions (softened by `temperature`, scaled by T²), optionally
plus next-token cross-entropy (the output term) and a hidden-state feature term: each student
block's output against the output of the reference block it came from (the map follows the blocks
depth pruning kept), read by module path with forward hooks, its mean squared error divided by the
reference's mean square, so every block weighs alike, averaged over the blocks.

The healing budget is `train_tokens` of training text, cut into `train.epochs` slices: every epoch
trains on a new slice and ends with a checkpoint and the validation perplexity, so the report holds
perplexity against healing tokens and an interrupted run resumes at the slice where it stopped with
the same weights. `max_minutes` stops before a slice would start past the time budget."""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from torchslim.config import Strict
from torchslim.distill.distiller import DistillationLoss, FeatureTerm, OutputTerm
from torchslim.distill.setup import DistillSetup
from torchslim.errors import RecipeError
from torchslim.log import console
from torchslim.models.transformer import transformer_blocks
from torchslim.results import StageResult
from torchslim.train import TrainConfig, TrainResult


class LMDistillConfig(Strict):
    train_tokens: int = Field(
        65536,
        ge=16,
        le=1_000_000_000,
        description="healing budget: tokens of training "
        "text (after the calibration and validation slices), cut into train.epochs slices",
    )
    max_minutes: Optional[float] = Field(
        None,
        gt=0,
        description="time budget: no slice starts after this many minutes of healing (the last one finishes)",
    )
    temperature: float = Field(1.0, gt=0, le=100, description="softens both next-token distributions of the KL term")
    kl_weight: float = Field(
        1.0, ge=0, description="weight of the KL divergence to the reference's next-token distribution"
    )
    ce_weight: float = Field(0.0, ge=0, description="weight of next-token cross-entropy on the training text")
    hidden_weight: float = Field(
        0.0,
        ge=0,
        description="weight of the hidden-state term: each block's output "
        "against the reference block it came from (normalised MSE)",
    )
    window: Optional[int] = Field(
        None, ge=8, le=32768, description="tokens per training sequence (default data.window)"
    )
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            epochs=4, lr=1e-4, weight_decay=0.0, batch_size=4, precision="auto", grad_clip=1.0
        )
    )

    @model_validator(mode="after")
    def _weights(self):
        if self.kl_weight + self.ce_weight + self.hidden_weight <= 0:
            raise ValueError("all loss weights are zero; give kl_weight, ce_weight or hidden_weight > 0")
        return self


class Slices(torch.utils.data.Dataset):
    """Windows of training text, a different slice every epoch (`epoch` is set before each)."""

    def __init__(self, windows: torch.Tensor, slices: int):
        self.windows, self.per_slice, self.epoch = windows, len(windows) // slices, 0

    def __len__(self) -> int:
        return self.per_slice

    def __getitem__(self, i: int):
        ids = self.windows[self.epoch * self.per_slice + i]
        return ids, torch.ones_like(ids)


def block_map(architecture: dict, teacher_blocks: int) -> list[int]:
    """For each block of the current model, the index of the reference block it came from."""
    current = list(range(teacher_blocks))
    for op in architecture.get("ops", []):
        current = [current[i] for i in op.get("keep_blocks", range(len(current)))]
    return current


def blocks_path(model: nn.Module) -> str:
    """The module path of the model's transformer blocks (their nn.ModuleList)."""
    blocks = transformer_blocks(model)
    return next(name for name, module in model.named_modules() if module is blocks)


class NextTokenKL(OutputTerm):
    """A language model's output term: `kl_weight * T²·KL(reference_T ‖ model_T)` per token, plus
    `ce_weight * next-token cross-entropy` when that weight is not zero; (ids, mask) batches."""

    def __init__(self, temperature: float = 1.0, kl_weight: float = 1.0, ce_weight: float = 0.0):
        self.temperature, self.kl_weight, self.ce_weight = temperature, kl_weight, ce_weight

    def inputs(self, batch: tuple) -> tuple:
        return batch[0], batch[1]

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, batch: tuple):
        t, ids = self.temperature, batch[0]
        target, logits = teacher_out.float(), student_out.float()
        kl = (
            F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
            * t
            * t
        )
        total, parts = self.kl_weight * kl, {"kl": kl}
        if self.ce_weight:
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            total, parts["ce"] = total + self.ce_weight * ce, ce
        return total, parts


def block_term(teacher: nn.Module, student: nn.Module, reference_blocks: list[int], weight: float) -> FeatureTerm:
    """The hidden-state term: student block i against reference block reference_blocks[i], the mean
    of their normalised MSEs."""
    s, t = blocks_path(student), blocks_path(teacher)
    return FeatureTerm(
        [f"{s}.{i}" for i in range(len(reference_blocks))],
        [f"{t}.{r}" for r in reference_blocks],
        "normalised_mse",
        weight,
        name="hidden",
        mean=True,
    )


class LMDistiller(DistillationLoss):
    """The next-token terms of `cfg`, plus the hidden-state term (block i of the student against block
    `reference_blocks[i]` of the teacher) when `cfg.hidden_weight` is not zero."""

    def __init__(self, teacher: nn.Module, student: nn.Module, cfg: LMDistillConfig, reference_blocks: list[int]):
        output = NextTokenKL(cfg.temperature, cfg.kl_weight, cfg.ce_weight)
        features = [block_term(teacher, student, reference_blocks, cfg.hidden_weight)] if cfg.hidden_weight else []
        super().__init__(teacher, output, features)


class LMDistillation(DistillSetup):
    """The current model learns from the task's float reference on new training text every epoch,
    within `max_minutes`; the result is the model with its perplexity-against-tokens curve."""

    config = LMDistillConfig
    summary = "Heal the current language model by distillation from the float reference on training text."
    description = "heal"

    def __init__(self, model: nn.Module, cfg: LMDistillConfig, ctx):
        self.cfg, self.ctx, self.student, self.teacher = cfg, ctx, model, ctx.task.reference
        self.window = cfg.window or ctx.recipe.data.window
        windows = ctx.task.healing_windows(cfg.train_tokens, self.window)
        self.slices = Slices(windows, cfg.train.epochs)
        if self.slices.per_slice == 0:
            raise RecipeError(
                f"distill: train_tokens {cfg.train_tokens:,} make {len(windows)} windows of {self.window} "
                f"tokens, fewer than train.epochs ({cfg.train.epochs}) slices; raise train_tokens to at "
                f"least {cfg.train.epochs * self.window:,} or lower train.epochs."
            )
        self.output = NextTokenKL(cfg.temperature, cfg.kl_weight, cfg.ce_weight)
        self.reference_blocks, self.features = [], []
        if cfg.hidden_weight:
            self.reference_blocks = block_map(ctx.architecture, len(transformer_blocks(self.teacher)))
            self.features = [block_term(self.teacher, model, self.reference_blocks, cfg.hidden_weight)]
        self.before = -ctx.task.validate(model)
        self.start = time.perf_counter()

    def train_set(self):
        return self.slices

    def epoch_setup(self, model: nn.Module, epoch: int) -> None:
        self.slices.epoch = epoch

    def stop(self) -> bool:
        return bool(self.cfg.max_minutes) and time.perf_counter() - self.start > self.cfg.max_minutes * 60

    def result(self, trained: TrainResult | None) -> StageResult:
        cfg, model, before = self.cfg, self.student.cpu().eval(), self.before
        tokens = self.slices.per_slice * self.window
        curve = [{"tokens": 0, "val_perplexity": before}] + [
            {"tokens": tokens * h["epoch"], "val_perplexity": -h["val_metric"]}
            for h in trained.history
            if "val_metric" in h
        ]
        # fit validated every slice: the weights it ends with are the best slice's (or the last's)
        after = -(trained.best_metric if cfg.train.restore_best else trained.history[-1]["val_metric"])
        console.log(f"heal: validation perplexity {before:.2f} -> {after:.2f} after {curve[-1]['tokens']:,} tokens")
        return StageResult(
            model,
            {
                "history": trained.history,
                "healing": {
                    "tokens_per_slice": tokens,
                    "slices": cfg.train.epochs,
                    "window": self.window,
                    "curve": curve,
                    "val_perplexity_before": before,
                    "val_perplexity_after": after,
                    "seconds": time.perf_counter() - self.start,
                    **({"block_map": self.reference_blocks} if self.reference_blocks else {}),
                },
            },
        )
