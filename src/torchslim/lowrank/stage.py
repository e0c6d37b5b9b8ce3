"""The `lowrank` recipe stage: factorise, then fine-tune through the one training loop."""

from __future__ import annotations

import json
from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from torchslim.io import atomic_write_text
from torchslim.log import console
from torchslim.lowrank.factorize import factorize
from torchslim.models.io import load_weights, save_weights
from torchslim.registry import register_stage
from torchslim.results import StageResult
from torchslim.train import TrainConfig


class LowRankConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    layers: Literal["all", "linear", "conv"] = Field("all", description="which layers are factorised")
    conv: Literal["tucker", "svd"] = Field(
        "tucker", description="k x k convolutions: Tucker-2 or SVD of the kernel matrix"
    )
    rank_ratio: Optional[float] = Field(None, gt=0, le=1, description="rank = ratio x full rank, per mode")
    energy: Optional[float] = Field(None, gt=0, le=1, description="smallest rank keeping this share of sum(sigma^2)")
    budget: Optional[float] = Field(None, gt=0, lt=1, description="whole-model share of budget_on to keep")
    budget_on: Literal["params", "flops"] = Field(
        "params", description="what budget counts: parameters or multiply-adds of Linear/Conv layers"
    )
    ranks: dict[str, Union[int, list[int]]] = Field(default_factory=dict, description="explicit rank per layer path")
    min_rank: int = Field(1, ge=1, description="no rank below this")
    round_to: int = Field(1, ge=1, le=256, description="ranks rounded up to a multiple of this")
    ignore: list[str] = Field(default_factory=list, description="module paths left dense")
    activation_aware: Literal["none", "scale", "whiten"] = Field(
        "none",
        description="Linear layers factorised as W·S from calibration inputs: scale (ASVD, "
        "S = diag(mean|x|^alpha)) or whiten (SVD-LLM, S = Cholesky factor of XᵀX: least output error)",
    )
    alpha: float = Field(0.5, gt=0, le=2, description="activation_aware scale: the exponent")
    calibration_batches: int = Field(16, ge=1, le=10000, description="activation_aware: real training batches")
    calibration_batch_size: int = Field(
        4, ge=1, le=4096, description="activation_aware: examples per calibration batch"
    )
    finetune: Optional[TrainConfig] = Field(None, description="training after factorising")

    @model_validator(mode="after")
    def _one_rule(self):
        given = [k for k in ("rank_ratio", "energy", "budget", "ranks") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of rank_ratio, energy, budget or ranks (got {', '.join(given) if given else 'none'})"
            )
        return self


@register_stage("lowrank", LowRankConfig, compresses=True)
def lowrank(model, cfg: LowRankConfig, ctx):
    """Replace Linear / Conv2d layers by their truncated SVD or Tucker-2 factors, then fine-tune."""
    factored, record_file = ctx.stage_dir / "factorised.safetensors", ctx.stage_dir / "factorised.json"
    before = sum(p.numel() for p in model.parameters())
    if ctx.resume and factored.exists() and record_file.exists():
        load_weights(model, factored)  # the factorised layers are rebuilt from the shapes stored with the weights
        saved = json.loads(record_file.read_text())
        records, notes = saved["records"], saved["notes"]
    else:
        records, notes = factorize(
            model,
            ctx.example(2),
            layers=cfg.layers,
            conv=cfg.conv,
            ignore=cfg.ignore,
            rank_ratio=cfg.rank_ratio,
            energy=cfg.energy,
            budget=cfg.budget,
            budget_on=cfg.budget_on,
            ranks=cfg.ranks,
            min_rank=cfg.min_rank,
            round_to=cfg.round_to,
            activation_aware=cfg.activation_aware,
            alpha=cfg.alpha,
            calibration=list(ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size))
            if cfg.activation_aware != "none"
            else None,
        )
        save_weights(model, factored)
        atomic_write_text(record_file, json.dumps({"records": records, "notes": notes}))
    after = sum(p.numel() for p in model.parameters())
    for note in notes:
        console.log(f"lowrank: {note}")
    console.log(
        f"lowrank: {sum(r['kind'] != 'dense' for r in records)} layer(s) factorised, "
        f"params {before:,} -> {after:,} ({after / before:.1%})"
    )
    info = {"factorised": records, "notes": notes}
    if cfg.finetune is not None:
        result = ctx.fit(
            model, cfg.finetune, checkpoint_dir=ctx.stage_dir / "checkpoint", description="lowrank fine-tune"
        )
        model.cpu()
        info["history"] = result.history
    return StageResult(model, info)
