"""The distiller: one loss function for the one training loop, combining the classic KD loss with
feature terms read by hooks, learned adapters where widths differ, and an optional on-disk cache of
the teacher's logits for a fixed dataset."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset

from torchslim.distill.hooks import capture
from torchslim.distill.losses import FEATURE_LOSSES, kd_loss
from torchslim.distributed import unwrap
from torchslim.log import steps

ADAPTERS = "torchslim_adapters"


@dataclass
class FeatureTerm:
    student: str
    teacher: str
    kind: str = "hint"  # hint | attention | attention_probs
    weight: float = 1.0


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
    tmp = path.with_name(path.name + ".tmp")  # a crash mid-write never leaves a cache that looks whole
    save_file({key: logits.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return logits


def _width(t: torch.Tensor) -> int:
    return t.shape[1] if t.dim() == 4 else t.shape[-1]


class Distiller:
    """`loss(student, batch) -> (total, parts)` with `soft_weight * soft + hard_weight * hard +
    sum(weight_i * feature_i)`; parts are logged separately by the training loop."""

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
        self.teacher, self.temperature = teacher.eval(), temperature
        self.soft_weight, self.hard_weight = soft_weight, hard_weight
        self.features, self.cached = list(features), cached_logits
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self._make_adapters(student, example)

    def _make_adapters(self, student: nn.Module, example: torch.Tensor) -> None:
        adapters = nn.ModuleDict()
        hints = [(i, f) for i, f in enumerate(self.features) if f.kind == "hint"]
        if hints:
            with (
                torch.no_grad(),
                capture(student, [f.student for _, f in hints], "student") as s,
                capture(self.teacher, [f.teacher for _, f in hints], "teacher") as t,
            ):
                was = student.training
                student.eval()(example)
                student.train(was)
                self.teacher(example)
            for i, f in hints:
                cs, ct = _width(s[f.student]), _width(t[f.teacher])
                if cs != ct:  # FitNets regressor from the student's width to the teacher's
                    adapters[str(i)] = nn.Conv2d(cs, ct, 1) if s[f.student].dim() == 4 else nn.Linear(cs, ct)
        setattr(student, ADAPTERS, adapters)

    def loss(self, student: nn.Module, batch: tuple):
        x, y = batch[0], batch[1]
        s_paths = [f.student for f in self.features]
        t_paths = [f.teacher for f in self.features]
        teacher_feats: dict = {}
        if self.cached is not None and not self.features and len(batch) > 2:
            teacher_logits = self.cached[batch[2].cpu()].to(x.device)  # the teacher is skipped entirely
        else:
            with torch.no_grad(), capture(self.teacher, t_paths, "teacher") as teacher_feats:
                teacher_logits = self.teacher(x)
        with capture(student, s_paths, "student") as student_feats:
            logits = student(x)
        total, parts = kd_loss(logits, teacher_logits.float(), y, self.temperature, self.soft_weight, self.hard_weight)
        adapters = getattr(unwrap(student), ADAPTERS)
        for i, f in enumerate(self.features):
            feat = student_feats[f.student]
            if str(i) in adapters:
                feat = adapters[str(i)](feat)
            term = FEATURE_LOSSES[f.kind](feat, teacher_feats[f.teacher].float())
            parts[f"{f.kind}{i}"] = term
            total = total + f.weight * term
        return total, parts

    @staticmethod
    def finish(student: nn.Module) -> None:
        """Drop the adapters: the student ships without them."""
        if hasattr(student, ADAPTERS):
            delattr(student, ADAPTERS)
