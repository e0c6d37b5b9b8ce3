"""What every stage receives besides the model: the task, settings, where to write, and the state
of the run so far (set by the pipeline from the stages' typed results, read by the stages)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from torchslim.train import fit


@dataclass
class RunContext:
    recipe: "object"  # torchslim.recipe.Recipe
    task: "object"  # torchslim.tasks.Task, set up (data loaded)
    run_dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    resume: bool = False
    search_dir: Path | None = None  # the recipe's folder, for entry points and relative paths
    stage_dir: Path | None = None  # set by the pipeline before each stage
    architecture: dict = field(default_factory=dict)  # how to rebuild the current model: {"model": spec, "ops": [...]}
    artifact: Path | None = None  # the lowered artifact served since a `Lowered` result (read-only for stages)
    on_epoch_end: Callable[[int, dict], None] | None = None  # hook for callers (progress, tests)
    run_recipe: Callable | None = None  # run plain recipe data (the planner's trials): run_recipe(data, dir, resume=)

    @property
    def data(self):
        """The task's DataBundle (tasks on labelled data)."""
        return self.task.data

    def fit(
        self,
        model,
        cfg,
        loss_fn=None,
        *,
        checkpoint_dir: Path,
        description: str,
        train_set=None,
        seed_offset: int = 0,
        epoch_setup: Callable | None = None,
        stop: Callable[[], bool] | None = None,
    ):
        """The one training loop as every stage runs it: the task's training set and loss unless given,
        validation with the task's metric, epoch checkpoints in `checkpoint_dir` (resumed when the run
        resumes), the recipe's seed, device and batch size."""
        task = self.task
        return fit(
            model,
            task.train_set() if train_set is None else train_set,
            cfg,
            loss_fn=loss_fn or task.loss(getattr(cfg, "label_smoothing", 0.0)),
            batch_size=cfg.batch_size or self.recipe.data.batch_size,
            validate=task.validate,
            checkpoint_dir=checkpoint_dir,
            resume=self.resume,
            seed=self.recipe.seed + seed_offset,
            device=self.device,
            on_epoch_end=self.on_epoch_end,
            epoch_setup=epoch_setup,
            stop=stop,
            description=description,
        )

    @property
    def exporter(self) -> str:
        """The ONNX exporter the recipe's export stage names (dynamo unless it says torchscript), used
        for every export of the run, so a choice made for the deliverable holds for every measurement."""
        return next((s.config.exporter for s in self.recipe.stages if s.name == "export"), "dynamo")

    def example(self, n: int) -> tuple:
        """`n` real held-out inputs as the model's argument tuple."""
        return self.task.example(n)

    def real_batch(self, batch_size: int) -> torch.Tensor:
        """The first input of `example(batch_size)` (models of one input)."""
        return self.task.example(batch_size)[0]
