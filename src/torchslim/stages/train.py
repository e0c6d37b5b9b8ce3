"""The `train` stage: train or fine-tune the current model with the one training loop."""

from __future__ import annotations

from torchslim.context import RunContext
from torchslim.registry import register_stage
from torchslim.train import TrainConfig, cross_entropy_loss


@register_stage("train", TrainConfig)
def train(model, cfg: TrainConfig, ctx: RunContext):
    """Train or fine-tune the current model on the training split, choosing epochs on validation."""
    result = ctx.fit(model, ctx.data.train, cfg, cross_entropy_loss(cfg.label_smoothing),
                     checkpoint_dir=ctx.stage_dir / "checkpoint", description=ctx.stage_dir.name)
    ctx.stage_info.update(history=result.history, best_epoch=result.best_epoch,
                          best_val_metric=result.best_metric, stopped_early=result.stopped_early,
                          precision=result.precision)
    return model
