"""The `train` stage: train or fine-tune the current model with the one training loop."""

from __future__ import annotations

from torchslim.registry import register_stage
from torchslim.train import TrainConfig


@register_stage("train", TrainConfig, needs=("labels",))
def train(model, cfg: TrainConfig, ctx):
    """Train or fine-tune the current model on the training split, choosing epochs on validation."""
    result = ctx.fit(model, cfg, checkpoint_dir=ctx.stage_dir / "checkpoint", description=ctx.stage_dir.name)
    ctx.stage_info.update(history=result.history, best_epoch=result.best_epoch,
                          best_val_metric=result.best_metric, stopped_early=result.stopped_early,
                          precision=result.precision)
    return model
