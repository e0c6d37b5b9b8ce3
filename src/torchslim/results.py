"""What a stage returns: the model and, typed, what became of it. The pipeline, resume and the
report dispatch on the type (recorded as `result` in the stage's report entry), never on flags.

A stage may also return a bare `nn.Module` (its model changed in place or replaced with the same
architecture record); `info` of any result is merged into the stage's report entry."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn


@dataclass
class StageResult:
    model: nn.Module
    info: dict = field(default_factory=dict)
    kind: ClassVar[str] = "model"


@dataclass
class Restructured(StageResult):
    """A model of another structure (a student, kept layers, pruned heads): `architecture` rebuilds it."""

    architecture: dict = field(default_factory=dict)
    kind: ClassVar[str] = "restructured"


@dataclass
class Lowered(StageResult):
    """The model lowered to a runtime artifact, served (and measured) from now on; `model` is the
    float model it came from."""

    artifact: Path | None = None
    kind: ClassVar[str] = "lowered"


@dataclass
class Exported(StageResult):
    """Deliverable files written; `onnx` (verified against PyTorch by the measurement) is reused."""

    onnx: Path | None = None
    kind: ClassVar[str] = "exported"


def as_result(value) -> StageResult:
    if isinstance(value, StageResult):
        return value
    if isinstance(value, nn.Module):
        return StageResult(value)
    raise TypeError(f"a stage must return an nn.Module or a torchslim.results.StageResult, got {type(value).__name__}")
