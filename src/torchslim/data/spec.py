"""How to feed a model: the `input` block of report.json."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch.utils.data import Dataset


@dataclass
class InputSpec:
    """Raw values times `pixel_scale`, minus `mean`, divided by `std` (per channel), fed as `name`."""

    shape: list  # with None for the batch axis, e.g. [None, 1, 28, 28]
    name: str = "input"
    dtype: str = "float32"
    pixel_scale: float = 1.0
    mean: list = field(default_factory=lambda: [0.0])
    std: list = field(default_factory=lambda: [1.0])

    def to_dict(self) -> dict:
        return asdict(self)

    def example(self, batch_size: int = 1) -> torch.Tensor:
        """A zero tensor of the right shape, for tracing and shape checks only (never for claims)."""
        return torch.zeros([batch_size, *self.shape[1:]], dtype=getattr(torch, self.dtype))


@dataclass
class DataBundle:
    """The three splits a run uses: train to fit, val to choose, test to report."""

    train: Dataset
    val: Dataset
    test: Dataset
    input: InputSpec
    num_classes: int | None = None
    description: str = ""
