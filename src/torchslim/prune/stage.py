"""The `prune` recipe stage: structured or unstructured, one-shot or scheduled, with fine-tuning
between steps through the one training loop. Every step's model is saved, so a run resumes at the
step (and, inside its fine-tuning, the epoch) where it stopped."""

from __future__ import annotations

import json
from typing import Annotated, Literal, Optional, Union

import torch
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, model_validator

from torchslim.config import ByVariant, only
from torchslim.cpu import vector_channels
from torchslim.errors import RecipeError
from torchslim.io import atomic_write_text
from torchslim.log import console
from torchslim.models.attention import Attention
from torchslim.models.io import load_weights, save_weights
from torchslim.prune.graph.structured import apply as apply_plan
from torchslim.prune.graph.structured import convert_attention, plan, taylor_gradients
from torchslim.prune.sparsity import schedule, unstructured
from torchslim.prune.sparsity.oneshot import prune_sequential
from torchslim.prune.transformer.decoder import decoder_blocks, is_decoder, prune_decoder, resize_decoder
from torchslim.prune.transformer.decoder import layer_shapes as decoder_shapes
from torchslim.prune.transformer.depth import (
    block_influence,
    keep_blocks,
    least_influential,
    least_loss,
    linear_bridges,
)
from torchslim.prune.transformer.encoder import is_encoder, layer_shapes, prune_encoder, resize_encoder
from torchslim.registry import register_stage
from torchslim.results import Restructured, StageResult
from torchslim.train import TrainConfig, epoch_loader


class Schedule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["one_shot", "steps", "gradual"] = Field(
        "one_shot", description="one cut, equal steps, or Zhu & Gupta's cubic ramp"
    )
    steps: int = Field(1, ge=1, le=100, description="pruning steps, each followed by finetune")
    initial: float = Field(0.0, ge=0, lt=1, description="gradual: sparsity at the first step's start")


STRUCTURED, SPARSE = only("structured"), only("magnitude", "random")
CALIBRATED = only("wanda", "sparsegpt", "blocks", "structured")


class PruneConfig(ByVariant):
    method: Literal["structured", "magnitude", "random", "nm", "wanda", "sparsegpt", "blocks"] = Field(
        "structured",
        description="structured: channels, neurons and heads leave the tensors; magnitude, random, "
        "nm, wanda, sparsegpt: single weights zeroed and stored sparsely; blocks: whole transformer blocks removed",
    )
    ratio: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="structured: share of channels/heads removed; "
        "blocks: share of the transformer's blocks removed (rounded to the nearest "
        "count)",
        json_schema_extra=only("structured", "blocks"),
    )
    score: Literal["influence", "loss"] = Field(
        "influence",
        description="blocks: how the blocks to remove are "
        "chosen — influence (one minus the cosine between a block's input and "
        "output, ShortGPT) or loss (greedy: the task's loss on the calibration "
        "batches with each candidate removed)",
        json_schema_extra=only("blocks"),
    )
    bridge: Literal["none", "linear"] = Field(
        "none",
        description="blocks: linear — each run of removed blocks "
        "replaced by a least-squares linear map on the calibration text, "
        "folded into the MLP output projection of the block before it (no "
        "parameter added; ReplaceMe)",
        json_schema_extra=only("blocks"),
    )
    remove: Optional[list[int]] = Field(
        None,
        min_length=1,
        description="blocks: the block indices to remove "
        "(instead of ratio; block influence is still measured and reported)",
        json_schema_extra=only("blocks"),
    )
    sparsity: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="magnitude/random: share of weights zeroed; "
        "wanda/sparsegpt: share of every row of every Linear layer (leave out for n:m)",
        json_schema_extra=only("magnitude", "random", "wanda", "sparsegpt"),
    )
    scope: Literal["global", "layer"] = Field("global", json_schema_extra=SPARSE)
    importance: Optional[Literal["l1", "l2", "bn_scale", "taylor", "random", "activation"]] = Field(
        None,
        description="structured: how channels are ranked (default l1); language models' heads and FFN "
        "neurons: activation (default: calibration activations times weight norms) or l1",
        json_schema_extra=STRUCTURED,
    )
    global_ranking: bool = Field(False, json_schema_extra=STRUCTURED)
    min_channels: int = Field(1, ge=1, json_schema_extra=STRUCTURED)
    round_to: Union[Literal["auto"], Annotated[int, Field(ge=1, le=256)]] = Field(
        "auto",
        description="kept channel counts are multiples of this; auto: the CPU's float32 vector width "
        "(16 with AVX-512, 8 with AVX2), which ONNX Runtime's blocked convolution kernels need to stay fast",
        json_schema_extra=STRUCTURED,
    )
    prune_heads: bool = Field(True, json_schema_extra=STRUCTURED)
    head_ratio: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="structured, transformers: share of every "
        "layer's attention heads removed (a language model's key/value heads, each "
        "with its query group; default: ratio if prune_heads)",
        json_schema_extra=STRUCTURED,
    )
    ffn_ratio: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="structured, transformers: share of every layer's FFN neurons removed (default: ratio)",
        json_schema_extra=STRUCTURED,
    )
    hidden_ratio: Optional[float] = Field(
        None,
        ge=0,
        lt=1,
        description="structured, language models: share of "
        "the residual stream's channels (the hidden size) removed from the "
        "embeddings, norms, every projection and the head, ranked by "
        "calibration activations; heal afterwards",
        json_schema_extra=STRUCTURED,
    )
    ignore: list[str] = Field(
        default_factory=list,
        validation_alias=AliasChoices("ignore", "exclude"),
        description="module paths (or globs) left alone: their outputs are kept",
    )
    layer_ratios: dict[str, float] = Field(
        default_factory=dict,
        description="structured: a final ratio per layer path instead of `ratio` (e.g. less for a sensitive layer)",
        json_schema_extra=STRUCTURED,
    )
    n: int = Field(
        2,
        ge=1,
        description="nm, or wanda/sparsegpt without sparsity: n of every m consecutive input weights kept",
        json_schema_extra=only("nm", "wanda", "sparsegpt"),
    )
    m: int = Field(4, ge=2, json_schema_extra=only("nm", "wanda", "sparsegpt"))
    calibration_batches: int = Field(
        16,
        ge=1,
        le=10000,
        description="wanda/sparsegpt: real training batches "
        "whose inputs to each layer score (and, for sparsegpt, update) its weights; "
        "blocks and a language model's width: the batches importance is measured on",
        json_schema_extra=CALIBRATED,
    )
    calibration_batch_size: int = Field(4, ge=1, le=4096, json_schema_extra=CALIBRATED)
    damp: float = Field(
        0.01,
        gt=0,
        le=1,
        description="sparsegpt: Hessian damping, a share of its mean diagonal",
        json_schema_extra=only("sparsegpt"),
    )
    schedule: Schedule = Field(
        default_factory=Schedule,
        description="one-shot or in steps; each step's target is a share of the original width",
    )
    finetune: Optional[TrainConfig] = Field(None, description="training after every step (epochs per step)")

    @model_validator(mode="after")
    def _amount(self):
        bad = {k: v for k, v in self.layer_ratios.items() if not 0 <= v < 1}
        if bad:
            raise ValueError(f"layer_ratios must be in [0, 1), got {bad}")
        if (
            self.method == "structured"
            and self.ratio is None
            and self.head_ratio is None
            and self.ffn_ratio is None
            and self.hidden_ratio is None
        ):
            raise ValueError(
                "method 'structured' needs 'ratio' (share of channels to remove), or head_ratio / "
                "ffn_ratio for a transformer (hidden_ratio too for a language model)"
            )
        if self.method in ("magnitude", "random") and self.sparsity is None:
            raise ValueError(f"method '{self.method}' needs 'sparsity' (share of weights to zero)")
        if self.method == "blocks" and (self.ratio is None) == (self.remove is None):
            raise ValueError(
                "method 'blocks' needs either 'ratio' (share of the blocks removed, the least "
                "influential first) or 'remove' (block indices), not both"
            )
        if self.method in ("nm", "wanda", "sparsegpt") and not 0 < self.n < self.m:
            raise ValueError(f"method 'nm' needs 0 < n < m, got {self.n}:{self.m}")
        return self

    def check_task(self, task) -> str | None:
        """What these settings cannot do for `task` (a Task class; None: nothing)."""
        lm, encoder = "lm" in task.provides, "encoder" in task.provides
        if self.method == "structured" and lm and self.importance not in (None, "activation", "l1"):
            return f"a language model's heads and FFN neurons are ranked by activation or l1, not '{self.importance}'"
        if self.hidden_ratio and not lm:
            return (
                f"hidden_ratio prunes a language model's hidden size (a task providing 'lm', e.g. causal_lm), "
                f"not a {task.name} model's; use ratio, head_ratio or ffn_ratio"
            )
        if self.hidden_ratio and self.importance == "l1":
            return (
                "hidden_ratio ranks the residual stream's channels by calibration activations; leave importance "
                "out (or set it to activation)"
            )
        if self.method == "structured" and encoder and self.importance not in (None, "l1"):
            return f"an encoder's heads and FFN neurons are ranked by l1, not '{self.importance}'"
        if self.method == "structured" and not lm and self.importance == "activation":
            return (
                "importance 'activation' ranks a language model's heads and FFN neurons; for channels use l1, "
                "l2, bn_scale, taylor or random"
            )
        return None

    @property
    def channel_multiple(self) -> int:
        return vector_channels() if self.round_to == "auto" else self.round_to

    @property
    def final(self) -> float:
        if self.method == "blocks":
            return self.ratio or 0.0
        if self.method == "structured":
            return (
                self.ratio
                if self.ratio is not None
                else max(self.head_ratio or 0.0, self.ffn_ratio or 0.0, self.hidden_ratio or 0.0)
            )
        if self.method == "nm" or (self.method in ("wanda", "sparsegpt") and self.sparsity is None):
            return 1 - self.n / self.m
        return self.sparsity

    def encoder_ratios(self) -> tuple[float, float]:
        """(heads, FFN neurons) removed from every layer of a transformer encoder."""
        ratio = self.ratio or 0.0
        heads = self.head_ratio if self.head_ratio is not None else (ratio if self.prune_heads else 0.0)
        return heads, self.ffn_ratio if self.ffn_ratio is not None else ratio


def _step_ratios(model, cfg: PruneConfig, original: dict[str, int], target: float) -> dict[str, float]:
    """Per-layer ratios for this step, so that after it every layer keeps its share of its *original*
    width (rounded up to `round_to`): steps do not compound rounding, and the last step lands exactly
    where a one-shot cut would."""
    current = _widths(model)
    out: dict[str, float] = {"default": 0.0}
    for name, width in original.items():
        if name not in current:
            continue
        layer_target = (
            target * cfg.layer_ratios.get(name.removesuffix(" (heads)"), cfg.ratio) / cfg.ratio if cfg.ratio else 0.0
        )
        keep = max(min(width, cfg.min_channels), width - int(round(layer_target * width)))
        if not name.endswith(" (heads)"):
            keep = min(width, -(-keep // cfg.channel_multiple) * cfg.channel_multiple)
        out[name.removesuffix(" (heads)")] = max(0.0, 1.0 - keep / current[name])
    return out


def _transformer_step(model, cfg: PruneConfig, ctx, previous: float, target: float) -> dict:
    """Heads and FFN neurons of a Hugging Face BERT-family encoder or Llama-layout decoder, so that
    after this step the final shares scale with the schedule's target."""

    def step(final: float) -> float:
        before, after = final * previous / cfg.final, final * target / cfg.final
        return 1 - (1 - after) / (1 - before) if cfg.final else 0.0

    heads, ffn = cfg.encoder_ratios()
    if is_decoder(model):
        importance = cfg.importance or "activation"
        hidden = step(cfg.hidden_ratio or 0.0)  # never implied by ratio
        batches = (
            ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size)
            if importance == "activation" or hidden
            else None
        )
        records = prune_decoder(model, step(heads), step(ffn), batches, importance, hidden_ratio=hidden)
        if records and "hidden_after" in records[0]:
            console.log(f"prune hidden size: {records[0]['hidden_before']} -> {records[0]['hidden_after']} channels")
        return {"encoder": records, "decoder_shapes": decoder_shapes(model)}
    records = prune_encoder(model, step(heads), step(ffn))
    return {"encoder": records, "layer_shapes": layer_shapes(model)}


def _step(model, cfg: PruneConfig, ctx, previous: float, target: float, original: dict[str, int]) -> dict:
    if cfg.method == "structured" and (is_encoder(model) or is_decoder(model)):
        return _transformer_step(model, cfg, ctx, previous, target)
    if cfg.method == "structured" and "lm" in ctx.task.provides:
        decoder_blocks(model)  # raises with what the layout lacks
    if cfg.method == "structured":
        example = ctx.real_batch(2)
        ratio = (
            schedule.step_ratio(previous, target) if cfg.global_ranking else _step_ratios(model, cfg, original, target)
        )
        if cfg.importance == "taylor":
            loader = epoch_loader(ctx.task.train_set(), ctx.recipe.data.batch_size, ctx.recipe.seed, 0)
            taylor_gradients(model, loader, ctx.task.loss())
        p = plan(
            model,
            example,
            ratio,
            cfg.importance or "l1",
            cfg.ignore,
            cfg.global_ranking,
            cfg.min_channels,
            cfg.channel_multiple,
            cfg.prune_heads,
        )
        apply_plan(model, p)
        model.zero_grad(set_to_none=True)
        console.log(p.summary())
        return {
            "notes": p.notes,
            "kept": [{"layers": list(k.producers), "channels": k.channels, "reasons": k.reasons} for k in p.kept],
        }
    if cfg.method in ("wanda", "sparsegpt"):
        pattern = {"sparsity": target} if cfg.sparsity is not None else {"n": cfg.n, "m": cfg.m}
        options = {"damp": cfg.damp} if cfg.method == "sparsegpt" else {}
        batches = ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size)
        records = prune_sequential(model, batches, cfg.method, **pattern, ignore=cfg.ignore, **options)
        return {"pruned_layers": records}
    if cfg.method == "nm":
        masks = unstructured.nm_masks(model, cfg.n, cfg.m, cfg.ignore)
    else:
        gen = torch.Generator().manual_seed(ctx.recipe.seed)
        masks = unstructured.magnitude_masks(model, target, cfg.scope, cfg.ignore, cfg.method == "random", gen)
    # zero the weights now; the masks are held (as gradient hooks) only while fine-tuning
    unstructured.remove_masks(unstructured.apply_masks(model, masks))
    return {}


def _prune_blocks(model, cfg: PruneConfig, ctx):
    """Remove whole transformer blocks, the least influential on the calibration text first (or the
    listed ones); the architecture record rebuilds the smaller model on resume and reload."""
    if "lm" not in ctx.task.provides:
        raise RecipeError(
            "prune method 'blocks' removes the blocks of a language model (a task providing 'lm', "
            "e.g. causal_lm); for a sentence encoder use distill with keep_layers, for "
            "a classifier distill into a student with fewer blocks."
        )
    record_path = ctx.stage_dir / "blocks.json"
    batches = None
    if ctx.resume and record_path.exists():
        record = json.loads(record_path.read_text())
    else:
        batches = ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size)
        influence = block_influence(model, batches)
        total, extra = len(influence), {}
        if cfg.remove is not None:
            remove = sorted(set(cfg.remove))
        elif cfg.score == "loss":
            remove, extra["loss"] = least_loss(model, batches, int(round(cfg.ratio * total)), ctx.task.loss())
        else:
            remove = least_influential(influence, int(round(cfg.ratio * total)))
        if any(not 0 <= i < total for i in remove) or len(remove) >= total:
            raise RecipeError(
                f"prune method 'blocks': cannot remove blocks {remove} of a model with {total} "
                f"(indices 0 to {total - 1}; keep at least one)."
            )
        record = {
            "influence": influence,
            "score": cfg.score,
            **extra,
            "removed": remove,
            "kept": [i for i in range(total) if i not in remove],
        }
        record_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(record_path, json.dumps(record))
    bridges = {}
    if cfg.bridge == "linear":  # fitted again on resume: the stage starts from the previous stage's model
        batches = batches or ctx.task.calibration(cfg.calibration_batches, cfg.calibration_batch_size)
        bridges["bridges"] = linear_bridges(model, batches, record["removed"])
        for fit in bridges["bridges"]:
            if "error" in fit:
                console.log(
                    f"prune blocks: linear bridge over blocks {fit['run'][0]}-{fit['run'][1]} folded into "
                    f"block {fit['into']}: error {fit['error']:.3f} of the removed blocks' change "
                    f"(plain removal {fit['error_plain']:.3f})"
                )
    before = sum(p.numel() for p in model.parameters())
    keep_blocks(model, record["kept"])
    after = sum(p.numel() for p in model.parameters())
    scores = ", ".join(f"{record['influence'][i]:.3f}" for i in record["removed"])
    console.log(f"prune blocks: removed {record['removed']} of {len(record['influence'])} (influence {scores})")
    info = {
        "blocks": {
            **record,
            **bridges,
            "params_before": before,
            "params_after": after,
            "param_reduction": 1 - after / before,
        }
    }
    return Restructured(
        model,
        info,
        architecture={**ctx.architecture, "ops": [*ctx.architecture.get("ops", []), {"keep_blocks": record["kept"]}]},
    )


@register_stage("prune", PruneConfig, compresses=True)
def prune(model, cfg: PruneConfig, ctx):
    """Prune structurally (channels, neurons, heads removed) or unstructurally (sparse storage)."""
    if cfg.method == "blocks":
        return _prune_blocks(model, cfg, ctx)
    if not is_encoder(model) and not is_decoder(model):
        convert_attention(model)
    targets = schedule.targets(cfg.schedule.kind, cfg.final, cfg.schedule.steps, cfg.schedule.initial)
    if cfg.method == "nm" or (cfg.method in ("wanda", "sparsegpt") and cfg.sparsity is None):
        targets = [cfg.final]
    total = sum(p.numel() for p in model.parameters())
    widths_before = _widths(model)  # (on resume too: the stage starts from the previous stage's model)
    steps, previous, notes = [], 0.0, []
    for k, target in enumerate(targets):
        step_dir = ctx.stage_dir / f"step-{k + 1}"
        saved = step_dir / "model.safetensors"
        if ctx.resume and saved.exists():
            record = _load_record(step_dir)
            if "layer_shapes" in record:  # heads and neurons are attributes too, not only tensor shapes
                resize_encoder(model, record["layer_shapes"])
            if "decoder_shapes" in record:
                resize_decoder(model, record["decoder_shapes"])
            load_weights(model, saved)
        else:
            record = {"step": k + 1, "target": target, **_step(model, cfg, ctx, previous, target, widths_before)}
            if cfg.finetune is not None:
                handles = (
                    unstructured.apply_masks(model, unstructured.masks_from_zeros(model, cfg.ignore))
                    if cfg.method != "structured"
                    else []
                )
                result = ctx.fit(
                    model,
                    cfg.finetune,
                    checkpoint_dir=step_dir / "checkpoint",
                    description=f"prune step {k + 1}",
                    seed_offset=k,
                )
                unstructured.remove_masks(handles)
                model.cpu()
                record["history"] = result.history
                record["val_metric"] = result.best_metric
            params = sum(p.numel() for p in model.parameters())
            nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())
            record.update(
                params=params, nonzero=nonzero, param_reduction=1 - params / total, sparsity=1 - nonzero / total
            )
            step_dir.mkdir(parents=True, exist_ok=True)
            _save_record(step_dir, record)
            save_weights(model, saved)
        console.log(
            f"prune step {k + 1}/{len(targets)}: target {target:.3f}, params {record['params']:,}, "
            f"non-zero {record['nonzero']:,}"
        )
        steps.append(record)
        notes += [n for n in record.get("notes", []) if n not in notes]
        previous = target
    history = [
        {**h, "epoch": i + 1, "prune_step": s["step"]}
        for i, (s, h) in enumerate((s, h) for s in steps for h in s.get("history", []))
    ]
    info = {"steps": steps, "history": history, "round_to": cfg.channel_multiple}
    shapes_key = next((k for k in ("layer_shapes", "decoder_shapes") if k in steps[-1]), None)
    encoder = cfg.method == "structured" and shapes_key is not None
    if encoder:
        info["pruned"] = [r for s in steps for r in s["encoder"]]
    if cfg.method == "structured":
        after = _widths(model)
        kept = steps[0].get("kept", [])
        info.update(
            notes=notes,
            kept=kept,
            layers=[
                {
                    "layer": name,
                    "before": w,
                    "after": after[name],
                    "sparsity": 1 - after[name] / w,
                    **({"why_kept": why} if after[name] == w and (why := _why_kept(name, kept)) else {}),
                }
                for name, w in widths_before.items()
            ],
        )
    else:
        info.update(
            layers=unstructured.layer_sparsity(model),
            note=(
                "Unstructured sparsity shrinks the stored artifact (storage_bytes) but not the latency of "
                "dense kernels: the ONNX model still multiplies by every zero."
            ),
        )
    if encoder:  # the layers' head and neuron counts rebuild the structure on resume
        return Restructured(
            model,
            info,
            architecture={
                **ctx.architecture,
                "ops": [*ctx.architecture.get("ops", []), {shapes_key: steps[-1][shapes_key]}],
            },
        )
    return StageResult(model, info)


def _why_kept(layer: str, kept: list[dict]) -> str | None:
    """The first reason the analysis gave for keeping the channels `layer` produces."""
    name = layer.removesuffix(" (heads)")
    for k in kept:
        if any(p == name or p.startswith(name + ".") for p in k["layers"]):
            return k["reasons"][0]
    return None


def _widths(model) -> dict[str, int]:
    """Output width of every layer that produces channels, and the head count of attention layers."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, Attention):
            out[f"{name} (heads)"] = m.num_heads
        elif isinstance(m, unstructured.PRUNABLE):
            out[name] = m.weight.shape[0]
    return out


def _save_record(step_dir, record):
    atomic_write_text(step_dir / "step.json", json.dumps(record))


def _load_record(step_dir):
    return json.loads((step_dir / "step.json").read_text())
