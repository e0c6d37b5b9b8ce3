"""The `train` stage: train or fine-tune the current model with the one training loop."""

from __future__ import annotations

from functools import partial

from torchslim.context import RunContext
from torchslim.registry import register_stage
from torchslim.train import TrainConfig, cross_entropy_loss, evaluate_accuracy, fit


@register_stage("train", TrainConfig)
def train(model, cfg: TrainConfig, ctx: RunContext):
    """Train or fine-tune the current model on the training split, choosing epochs on validation."""
    result = fit(model, ctx.data.train, cfg, loss_fn=cross_entropy_loss(cfg.label_smoothing),
                 batch_size=cfg.batch_size or ctx.recipe.data.batch_size,
                 validate=partial(evaluate_accuracy, dataset=ctx.data.val,
                                  batch_size=ctx.recipe.data.eval_batch_size, device=ctx.device),
                 checkpoint_dir=ctx.stage_dir / "checkpoint", resume=ctx.resume, seed=ctx.recipe.seed,
                 device=ctx.device, on_epoch_end=ctx.on_epoch_end, description=ctx.stage_dir.name)
    ctx.stage_info.update(history=result.history, best_epoch=result.best_epoch,
                          best_val_metric=result.best_metric, stopped_early=result.stopped_early,
                          precision=result.precision)
    return model
