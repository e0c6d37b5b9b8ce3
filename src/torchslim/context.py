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

    def fit(self, model, train_set, cfg, loss_fn, *, checkpoint_dir: Path, description: str, seed_offset: int = 0,
            epoch_setup: Callable | None = None):
        """The one training loop as every stage runs it: validation on the val split, epoch checkpoints in
        `checkpoint_dir` (resumed when the run resumes), the recipe's seed, device and batch size."""
        from functools import partial

        from torchslim.train import evaluate_accuracy, fit
        return fit(model, train_set, cfg, loss_fn=loss_fn, batch_size=cfg.batch_size or self.recipe.data.batch_size,
                   validate=partial(evaluate_accuracy, dataset=self.data.val,
                                    batch_size=self.recipe.data.eval_batch_size, device=self.device),
                   checkpoint_dir=checkpoint_dir, resume=self.resume, seed=self.recipe.seed + seed_offset,
                   device=self.device, on_epoch_end=self.on_epoch_end, epoch_setup=epoch_setup,
                   description=description)

    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole held-out test split as two tensors (inputs, targets), cached."""
        if self._test is None:
            xs, ys = zip(*(self.data.test[i] for i in range(len(self.data.test))))
            self._test = (torch.stack(xs), torch.as_tensor(ys))
        return self._test

    @property
    def exporter(self) -> str:
        """The ONNX exporter the recipe's export stage names (dynamo unless it says torchscript), used
        for every export of the run, so a choice made for the deliverable holds for every measurement."""
        return next((s.config.exporter for s in self.recipe.stages if s.name == "export"), "dynamo")

    def comparison_feeds(self) -> dict[str, dict]:
        """{label: ONNX Runtime feed} for the end-of-run interleaved comparison: real test inputs."""
        sizes = self.recipe.measure.compare_batch_sizes or [self.recipe.measure.batch_size]
        return {f"batch {n}": {self.data.input.name: self.real_batch(n).numpy()} for n in sizes}

    def real_batch(self, batch_size: int) -> torch.Tensor:
        """`batch_size` real test inputs (repeated if the test split is smaller)."""
        x = self.test_tensors()[0]
        reps = -(-batch_size // len(x))
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:batch_size].contiguous()
