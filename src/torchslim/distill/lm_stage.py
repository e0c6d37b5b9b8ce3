"""The causal_lm task's `distill`: healing a pruned (or otherwise changed) language model by
distillation from the float reference model on training text the evaluation never sees.

The student is the current model; the teacher is the task's float reference. The loss is the KL
divergence of the next-token distributions (softened by `temperature`, scaled by T²), optionally
plus next-token cross-entropy and a hidden-state term: each student block's output against the
output of the reference block it came from (the map follows the blocks depth pruning kept), its
mean squared error divided by the reference's mean square, so every block weighs alike.

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
from torchslim.errors import RecipeError
from torchslim.log import console
from torchslim.models.transformer import hidden_states, transformer_blocks
from torchslim.registry import register_stage
from torchslim.results import StageResult
from torchslim.train import TrainConfig


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


class BlockOutputs:
    """Forward hooks that keep the outputs of chosen blocks (with their graph, for the student)."""

    def __init__(self, blocks: nn.ModuleList, indices: list[int]):
        self.out: dict[int, torch.Tensor] = {}
        self.handles = [
            blocks[i].register_forward_hook(lambda m, a, o, i=i: self.out.__setitem__(i, hidden_states(o)))
            for i in indices
        ]

    def remove(self):
        for h in self.handles:
            h.remove()


def distillation_loss(
    teacher: nn.Module,
    cfg: LMDistillConfig,
    student_hidden: BlockOutputs | None = None,
    teacher_hidden: BlockOutputs | None = None,
    pairs: list[tuple[int, int]] = (),
):
    """loss_fn(model, (ids, mask)) for the one training loop."""
    t = cfg.temperature

    def loss_fn(model: nn.Module, batch: tuple):
        ids, mask = batch
        with torch.no_grad():
            target = teacher(ids, mask).float()
        logits = model(ids, mask).float()
        kl = (
            F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(target / t, -1), log_target=True, reduction="none")
            .sum(-1)
            .mean()
            * t
            * t
        )
        total, parts = cfg.kl_weight * kl, {"kl": kl}
        if cfg.ce_weight:
            ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
            total, parts["ce"] = total + cfg.ce_weight * ce, ce
        if cfg.hidden_weight and pairs:
            hidden = sum(
                F.mse_loss(student_hidden.out[s].float(), teacher_hidden.out[r].float())
                / teacher_hidden.out[r].float().pow(2).mean().clamp_min(1e-12)
                for s, r in pairs
            ) / len(pairs)
            total, parts["hidden"] = total + cfg.hidden_weight * hidden, hidden
        return total, parts

    return loss_fn


@register_stage("distill", LMDistillConfig, compresses=True, tasks=("causal_lm",))
def heal(model, cfg: LMDistillConfig, ctx):
    """Heal the current language model by distillation from the float reference on training text."""
    task = ctx.task
    teacher = task.reference
    window = cfg.window or ctx.recipe.data.window
    windows = task.healing_windows(cfg.train_tokens, window)
    slices = Slices(windows, cfg.train.epochs)
    if slices.per_slice == 0:
        raise RecipeError(
            f"distill: train_tokens {cfg.train_tokens:,} make {len(windows)} windows of {window} "
            f"tokens, fewer than train.epochs ({cfg.train.epochs}) slices; raise train_tokens to at "
            f"least {cfg.train.epochs * window:,} or lower train.epochs."
        )
    pairs: list[tuple[int, int]] = []
    student_hidden = teacher_hidden = None
    if cfg.hidden_weight:
        student_blocks, teacher_blocks = transformer_blocks(model), transformer_blocks(teacher)
        pairs = list(enumerate(block_map(ctx.architecture, len(teacher_blocks))))
        student_hidden = BlockOutputs(student_blocks, [s for s, _ in pairs])
        teacher_hidden = BlockOutputs(teacher_blocks, [r for _, r in pairs])
    before = -task.validate(model)
    start = time.perf_counter()
    stop = (lambda: time.perf_counter() - start > cfg.max_minutes * 60) if cfg.max_minutes else None
    try:  # a resumed run continues from the last slice's checkpoint (or returns its history if done)
        result = ctx.fit(
            model,
            cfg.train,
            distillation_loss(teacher, cfg, student_hidden, teacher_hidden, pairs),
            train_set=slices,
            checkpoint_dir=ctx.stage_dir / "ckpt",
            description="heal",
            epoch_setup=lambda m, epoch: setattr(slices, "epoch", epoch),
            stop=stop,
        )
    finally:
        for hooks in (student_hidden, teacher_hidden):
            if hooks is not None:
                hooks.remove()
    model.cpu().eval()
    tokens = slices.per_slice * window
    curve = [{"tokens": 0, "val_perplexity": before}] + [
        {"tokens": tokens * h["epoch"], "val_perplexity": -h["val_metric"]} for h in result.history if "val_metric" in h
    ]
    # fit validated every slice: the weights it ends with are the best slice's (or the last's)
    after = -(result.best_metric if cfg.train.restore_best else result.history[-1]["val_metric"])
    console.log(f"heal: validation perplexity {before:.2f} -> {after:.2f} after {curve[-1]['tokens']:,} tokens")
    return StageResult(
        model,
        {
            "history": result.history,
            "healing": {
                "tokens_per_slice": tokens,
                "slices": cfg.train.epochs,
                "window": window,
                "curve": curve,
                "val_perplexity_before": before,
                "val_perplexity_after": after,
                "seconds": time.perf_counter() - start,
                **({"block_map": [r for _, r in pairs]} if pairs else {}),
            },
        },
    )
