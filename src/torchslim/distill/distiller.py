"""The distillation loss, one for every task: the task's output term (what it compares at the models'
outputs) plus weighted feature terms read inside both models by module path with forward hooks
(`hooks.capture`), learned adapters where a hint's widths differ, and an optional on-disk cache of
the teacher's logits for a fixed dataset. `Distiller` is the classifier's: the KD loss on logits."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim.distill.hooks import capture
from torchslim.distill.losses import FEATURE_LOSSES, kd_loss
from torchslim.distributed import unwrap
from torchslim.io import replacing
from torchslim.log import steps

ADAPTERS = "torchslim_adapters"


@dataclass
class FeatureTerm:
    """A weighted term of the loss on intermediate outputs: the student's module at `student` against
    the teacher's at `teacher` ("layers.0.attn[1]" for an element of a tuple output), compared by the
    loss `kind` names (`losses.FEATURE_LOSSES`). Lists of paths make one term of several pairs: the
    sum of their losses, or their mean with `mean=True`. `name`: the loss part's name in the history
    (default: kind and the term's index, "hint0")."""

    student: str | list[str]
    teacher: str | list[str]
    kind: str = "hint"  # hint | attention | attention_probs | masked_mse | normalised_mse
    weight: float = 1.0
    name: str | None = None
    mean: bool = False

    @property
    def pairs(self) -> list[tuple[str, str]]:
        if isinstance(self.student, str):
            return [(self.student, self.teacher)]
        return list(zip(self.student, self.teacher))


class OutputTerm:
    """What a task compares at the models' outputs: `inputs(batch)` are both models' arguments,
    `teacher_outputs(batch)` the teacher's outputs when known without running it (None: run it), and
    `loss(student_out, teacher_out, batch)` returns (weighted total, {part: value})."""

    def inputs(self, batch: tuple) -> tuple:
        return (batch[0],)

    def teacher_outputs(self, batch: tuple) -> torch.Tensor | None:
        return None

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, batch: tuple):
        raise NotImplementedError


class Indexed(Dataset):
    """(inputs, target, index): lets the loss look up cached teacher outputs."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return (*self.dataset[i], i)


def _fingerprint(model: nn.Module) -> str:
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_cache(teacher: nn.Module, dataset: Dataset, path: Path, batch_size: int = 256) -> torch.Tensor:
    """Teacher logits for every example of `dataset`, computed once and kept in `path`; a cache of a
    different teacher or dataset size is recomputed."""
    key = f"{_fingerprint(teacher)}-{len(dataset)}"
    if path.exists():
        try:
            cached = load_file(str(path))
        except Exception:  # unreadable (an old non-atomic write cut off): recompute it
            cached = {}
        if key in cached:
            return cached[key]
    teacher.eval()
    loader, out = DataLoader(dataset, batch_size=batch_size), []
    with torch.no_grad(), steps("distill: caching the teacher's logits", len(loader)) as progress:
        for batch in loader:
            out.append(teacher(batch[0]))
            progress.advance()
    logits = torch.cat(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with replacing(path) as tmp:  # a crash mid-write never leaves a cache that looks whole
        save_file({key: logits.contiguous()}, str(tmp))
    return logits


def _width(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 4 else t.shape[-1]


def _adapter_key(term: int, pair: int, pairs: int) -> str:
    return str(term) if pairs == 1 else f"{term}_{pair}"


class DistillationLoss:
    """`loss(student, batch) -> (total, parts)`: the output term's total, plus `weight_i * feature_i`
    for every feature term in order; parts are logged separately by the training loop. The teacher is
    frozen; with `student` and `example`, hint terms whose widths differ get a learned adapter
    (FitNets: a 1x1 convolution or a linear map to the teacher's width), trained with the student and
    dropped by `finish`."""

    def __init__(
        self,
        teacher: nn.Module,
        output: OutputTerm,
        features: list[FeatureTerm] = (),
        student: nn.Module | None = None,
        example: torch.Tensor | None = None,
    ):
        self.teacher, self.output, self.features = teacher.eval(), output, list(features)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student_paths = [s for f in self.features for s, _ in f.pairs]
        self.teacher_paths = [t for f in self.features for _, t in f.pairs]
        if student is not None and example is not None:
            self._make_adapters(student, example)

    def _make_adapters(self, student: nn.Module, example: torch.Tensor) -> None:
        adapters = nn.ModuleDict()
        hints = [(i, f) for i, f in enumerate(self.features) if f.kind == "hint"]
        if hints:
            with (
                torch.no_grad(),
                capture(student, [s for _, f in hints for s, _ in f.pairs], "student") as s,
                capture(self.teacher, [t for _, f in hints for _, t in f.pairs], "teacher") as t,
            ):
                was = student.training
                student.eval()(example)
                student.train(was)
                self.teacher(example)
            for i, f in hints:
                for j, (sp, tp) in enumerate(f.pairs):
                    cs, ct = _width(s[sp]), _width(t[tp])
                    if cs != ct:  # FitNets regressor from the student's width to the teacher's
                        adapter = nn.Conv2d(cs, ct, 1) if s[sp].dim() == 4 else nn.Linear(cs, ct)
                        adapters[_adapter_key(i, j, len(f.pairs))] = adapter
        setattr(student, ADAPTERS, adapters)

    def loss(self, student: nn.Module, batch: tuple):
        inputs = self.output.inputs(batch)
        teacher_feats: dict = {}
        teacher_out = None if self.features else self.output.teacher_outputs(batch)
        if teacher_out is None:
            with torch.no_grad(), capture(self.teacher, self.teacher_paths, "teacher") as teacher_feats:
                teacher_out = self.teacher(*inputs)
        with capture(student, self.student_paths, "student") as student_feats:
            out = student(*inputs)
        total, parts = self.output.loss(out, teacher_out, batch)
        adapters = getattr(unwrap(student), ADAPTERS, {})
        for i, f in enumerate(self.features):
            term = None
            for j, (sp, tp) in enumerate(f.pairs):
                feat, key = student_feats[sp], _adapter_key(i, j, len(f.pairs))
                if key in adapters:
                    feat = adapters[key](feat)
                value = FEATURE_LOSSES[f.kind](feat, teacher_feats[tp].float(), inputs)
                term = value if term is None else term + value
            if f.mean:
                term = term / len(f.pairs)
            parts[f.name or f"{f.kind}{i}"] = term
            total = total + f.weight * term
        return total, parts

    @staticmethod
    def finish(student: nn.Module) -> None:
        """Drop the adapters: the student ships without them."""
        if hasattr(student, ADAPTERS):
            delattr(student, ADAPTERS)


class LogitKD(OutputTerm):
    """A classifier's output term: `soft_weight * T²·KL(teacher_T ‖ student_T) + hard_weight *
    CE(labels)` on the logits; with `cached` teacher logits (rows by example index, the batch's third
    element) the teacher is not run."""

    def __init__(self, temperature: float, soft_weight: float, hard_weight: float, cached: torch.Tensor | None = None):
        self.temperature, self.soft_weight, self.hard_weight, self.cached = (
            temperature,
            soft_weight,
            hard_weight,
            cached,
        )

    def teacher_outputs(self, batch: tuple) -> torch.Tensor | None:
        if self.cached is None or len(batch) <= 2:
            return None
        return self.cached[batch[2].cpu()].to(batch[0].device)

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, batch: tuple):
        return kd_loss(student_out, teacher_out.float(), batch[1], self.temperature, self.soft_weight, self.hard_weight)


class Distiller(DistillationLoss):
    """A classifier's distillation loss: `soft_weight * soft + hard_weight * hard + sum(weight_i *
    feature_i)`, the teacher skipped for cached logits when there are no feature terms."""

    def __init__(
        self,
        teacher: nn.Module,
        student: nn.Module,
        example: torch.Tensor,
        temperature: float = 4.0,
        soft_weight: float = 0.7,
        hard_weight: float = 0.3,
        features: list[FeatureTerm] = (),
        cached_logits: torch.Tensor | None = None,
    ):
        output = LogitKD(temperature, soft_weight, hard_weight, cached_logits)
        super().__init__(teacher, output, features, student, example)
