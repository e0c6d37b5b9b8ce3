"""What every stage receives besides the model: data, settings, where to write, and what to report."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from torchslim.data.spec import DataBundle


@dataclass
class RunContext:
    recipe: "object"  # torchslim.recipe.Recipe (kept loose to avoid an import cycle)
    data: DataBundle
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False
    search_dir: Path | None = None  # the recipe's folder, for entry points and relative paths
    stage_dir: Path | None = None  # set by the pipeline before each stage
    stage_info: dict = field(default_factory=dict)  # extra fields a stage adds to its report entry
    onnx_path: Path | None = None  # an ONNX file the stage already wrote, reused by `measure`
    architecture: dict = field(default_factory=dict)  # how to rebuild the current model: {"model": spec, "ops": [...]}
    artifact_onnx: Path | None = None  # a lowered (quantized) artifact that replaces the float export from now on
    on_epoch_end: Callable[[int, dict], None] | None = None  # hook for callers (progress, tests)
    _test: tuple | None = None

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole held-out test split as two tensors (inputs, targets), cached."""
        if self._test is None:
            xs, ys = zip(*(self.data.test[i] for i in range(len(self.data.test))))
            self._test = (torch.stack(xs), torch.as_tensor(ys))
        return self._test

    def real_batch(self, batch_size: int) -> torch.Tensor:
        """`batch_size` real test inputs (repeated if the test split is smaller)."""
        x = self.test_tensors()[0]
        reps = -(-batch_size // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].contiguous()
