"""A classifier's distillation (the `distill` stage on every task that provides a classifier): the
current model (or a given one) teaches a student, built or derived from the teacher, which becomes
the current model. The output term is the KD loss on logits (from an on-disk cache of the teacher's
logits when there are no feature terms); feature terms by module path come from `features`."""

from __future__ import annotations

from typing import Literal, Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from torchslim.distill.distiller import FeatureTerm, Indexed, LogitKD, teacher_cache
from torchslim.distill.setup import DistillSetup
from torchslim.distill.students import derive_depth, derive_width
from torchslim.log import console
from torchslim.models.io import build_model
from torchslim.models.spec import ModelSpec
from torchslim.results import Restructured
from torchslim.train import TrainConfig, TrainResult, evaluate_accuracy


class StudentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    builtin: Optional[str] = Field(None, description="a model of the built-in zoo, e.g. cnn_student")
    entrypoint: Optional[str] = Field(None, description="'module:function' returning the student")
    kwargs: dict = Field(default_factory=dict, description="keyword arguments for the builder")
    derive: Optional[Literal["width", "depth"]] = Field(None, description="derive the student from the teacher")
    ratio: float = Field(0.5, gt=0, lt=1, description="derive width: share of channels removed")
    importance: Literal["l1", "l2", "bn_scale", "random"] = Field(
        "l1", description="derive width: how the teacher's channels are ranked"
    )
    blocks: Optional[str] = Field(None, description="derive depth: module path of the Sequential/ModuleList")
    keep_every: int = Field(2, ge=2, description="derive depth: keep every k-th block (and the last)")

    @model_validator(mode="after")
    def _one(self):
        given = [x for x in (self.builtin, self.entrypoint, self.derive) if x is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'builtin', 'entrypoint' or 'derive'")
        if self.derive == "depth" and not self.blocks:
            raise ValueError("derive 'depth' needs 'blocks' (the module path of the encoder's block list)")
        if self.builtin is not None:
            ModelSpec(builtin=self.builtin)  # same check and message as the recipe's model
        return self


class Feature(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: str = Field(..., description="module path in the student ('layers.0.attn[1]' for a tuple output)")
    teacher: str = Field(..., description="module path in the teacher")
    kind: Literal["hint", "attention", "attention_probs"] = Field(
        "hint",
        description="hint: FitNets (an adapter where widths differ); attention: attention transfer; "
        "attention_probs: a transformer's attention maps",
    )
    weight: float = Field(1.0, ge=0, description="weight of this term in the loss")


class DistillConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    student: StudentSpec = Field(..., description="built-in, an entry point, or derived from the teacher")
    teacher: Optional[ModelSpec] = Field(None, description="default: the current model of the recipe")
    temperature: float = Field(4.0, gt=0, le=100, description="softens both distributions of the KL term")
    soft_weight: float = Field(0.7, ge=0, description="weight of the temperature-softened KL term")
    hard_weight: float = Field(0.3, ge=0, description="weight of cross-entropy with the labels")
    features: list[Feature] = Field(default_factory=list, description="feature terms by module path")
    cache_teacher: bool = Field(True, description="keep the teacher's logits on disk (logit-only distillation)")
    train: TrainConfig = Field(..., description="the training settings (the one loop)")

    @model_validator(mode="after")
    def _weights(self):
        if self.soft_weight + self.hard_weight + sum(f.weight for f in self.features) <= 0:
            raise ValueError("all loss weights are zero; give soft_weight, hard_weight or a feature weight > 0")
        return self


def _student(cfg: StudentSpec, teacher, ctx):
    """(student, architecture record for rebuilding it on resume)."""
    if cfg.derive == "width":
        return derive_width(teacher, ctx.real_batch(2), cfg.ratio, cfg.importance), dict(ctx.architecture)
    if cfg.derive == "depth":
        student, kept = derive_depth(teacher, cfg.blocks, cfg.keep_every)
        arch = dict(ctx.architecture)
        arch["ops"] = [*arch.get("ops", []), {"keep_blocks": cfg.blocks, "indices": kept}]
        return student, arch
    spec = ModelSpec(builtin=cfg.builtin, entrypoint=cfg.entrypoint, kwargs=cfg.kwargs)
    return build_model(spec, ctx.data.num_classes, ctx.search_dir), {"model": spec.model_dump(mode="json"), "ops": []}


def _params(m) -> int:
    return sum(p.numel() for p in m.parameters())


class LogitDistillation(DistillSetup):
    """The teacher (the current model or `teacher:`) on the recipe's device, a student built or
    derived from it (seeded by the recipe), the teacher's logits cached when only logits are compared;
    the result is the student with its architecture record and the teacher-vs-student comparison."""

    config = DistillConfig
    summary = "Train a student to match the teacher (logits, features, attention); the student is the result."
    checkpoint = "checkpoint"

    def __init__(self, model, cfg: DistillConfig, ctx):
        self.cfg, self.ctx = cfg, ctx
        teacher = build_model(cfg.teacher, ctx.data.num_classes, ctx.search_dir) if cfg.teacher else model
        teacher = teacher.cpu().eval()
        torch.manual_seed(ctx.recipe.seed)
        self.student, self.architecture = _student(cfg.student, teacher, ctx)
        self.features = [FeatureTerm(**f.model_dump()) for f in cfg.features]
        cached, self.train_data = None, ctx.data.train
        if cfg.cache_teacher and not self.features:
            cached = teacher_cache(
                teacher, ctx.data.train, ctx.stage_dir / "teacher_logits.safetensors", ctx.recipe.data.eval_batch_size
            )
            self.train_data = Indexed(ctx.data.train)
        self.teacher_cached = cached is not None
        self.teacher = teacher.to(ctx.device)
        self.example = ctx.real_batch(2).to(ctx.device)
        self.output = LogitKD(cfg.temperature, cfg.soft_weight, cfg.hard_weight, cached)

    def train_set(self):
        return self.train_data

    def result(self, trained: TrainResult | None) -> Restructured:
        cfg, ctx, teacher, student = self.cfg, self.ctx, self.teacher, self.student.cpu()
        t_acc = evaluate_accuracy(teacher.cpu(), ctx.data.test, ctx.recipe.data.eval_batch_size)
        s_acc = evaluate_accuracy(student, ctx.data.test, ctx.recipe.data.eval_batch_size)
        comparison = {
            "teacher_params": _params(teacher),
            "student_params": _params(student),
            "compression": _params(teacher) / _params(student),
            "teacher_accuracy": t_acc,
            "student_accuracy": s_acc,
            "retention": s_acc / t_acc if t_acc else None,
        }
        console.log(
            "distill: teacher {teacher_params:,} params, acc {teacher_accuracy:.4f}; student {student_params:,} "
            "params, acc {student_accuracy:.4f}; {compression:.1f}x fewer parameters, "
            "{retention:.1%} of the teacher's accuracy".format(**comparison)
        )
        return Restructured(
            student,
            dict(
                history=trained.history,
                comparison=comparison,
                weights={
                    "soft": cfg.soft_weight,
                    "hard": cfg.hard_weight,
                    **{f"{f.kind}{i}": f.weight for i, f in enumerate(cfg.features)},
                },
                teacher_cached=self.teacher_cached,
            ),
            architecture=self.architecture,
        )
