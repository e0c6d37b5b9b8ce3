"""The `train` stage: train or fine-tune the current model with the one training loop."""

from __future__ import annotations

import time

from pydantic import Field

from torchslim import cache, distributed
from torchslim.log import console
from torchslim.registry import register_stage
from torchslim.results import StageResult
from torchslim.train import TrainConfig


class TrainStageConfig(TrainConfig):
    """Settings of one training run; the `train` stage's recipe keys."""

    cache: bool = Field(
        False,
        description="reuse the weights of an identical earlier training (same starting "
        "weights, data, settings, seed, torch and torchslim code) from the cache folder "
        "($TORCHSLIM_CACHE, default ~/.cache/torchslim), and store this one there; the report "
        "records when weights were reused",
    )


def _cache_settings(cfg: TrainStageConfig, ctx) -> dict:
    recipe = ctx.recipe
    return {
        "train": cfg.model_dump(mode="json", exclude={"cache"}),
        "data": recipe.data.model_dump(mode="json"),
        "task": str(recipe.task),
        "seed": recipe.seed,
        "device": ctx.device.type,
        "world": distributed.world(),
    }


@register_stage("train", TrainStageConfig, needs=("labels",))
def train(model, cfg: TrainStageConfig, ctx):
    """Train or fine-tune the current model on the training split, choosing epochs on validation."""
    key = cache.training_key(model, _cache_settings(cfg, ctx)) if cfg.cache else None
    hit = cache.lookup(key, model) if key else None
    if hit is not None:
        console.log(
            f"{ctx.stage_dir.name}: reused the weights of an identical training from {hit['path']} "
            f"(trained there in {hit['seconds']:.0f} s; delete that folder to train again)"
        )
        info = {k: hit[k] for k in ("history", "best_epoch", "best_val_metric", "stopped_early", "precision")}
        return StageResult(
            model, {**info, "cached": {"key": key, "path": hit["path"], "trained_seconds": hit["seconds"]}}
        )
    start = time.perf_counter()
    result = ctx.fit(model, cfg, checkpoint_dir=ctx.stage_dir / "checkpoint", description=ctx.stage_dir.name)
    info = dict(
        history=result.history,
        best_epoch=result.best_epoch,
        best_val_metric=result.best_metric,
        stopped_early=result.stopped_early,
        precision=result.precision,
    )
    if key and distributed.is_main():
        cache.store(key, model, {**info, "seconds": time.perf_counter() - start})
    return StageResult(model, info)
