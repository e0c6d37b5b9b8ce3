"""A `Task` is the one place that knows a kind of model: how to build the model and its data, the
training loss, the validation metric, real example and calibration inputs, how to export and feed
the served artifact, and how to turn the served runtime's outputs into the task's metrics.

The pipeline, the measurement and every stage talk to the model only through the task, so a new
kind of model (a regressor, a detector, a causal language model) is a new `Task` subclass,
registered with `@register_task("name")` or named in a recipe as `task: {entrypoint: "pkg.mod:Cls"}`,
and the pipeline does not change. A subclass implements the methods that raise NotImplementedError;
the others have defaults that suit a model taking one or more tensors and returning one tensor.

Conventions:
- inputs are tuples of tensors with the batch first (the model is called as `model(*inputs)`);
- a *predictor* is a callable `predict(*inputs) -> numpy array` that runs either the PyTorch model or
  the served ONNX Runtime session (`torch_predictor`, `onnx_predictor`), so a metric is always
  computed from the runtime that serves the model;
- `score` and `validate` return the validation metric with larger = better (a lower-is-better
  metric such as a mean absolute error is negated there); reported metrics keep their sign."""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from torchslim.distill.logits import LogitDistillation
from torchslim.entrypoint import resolve
from torchslim.errors import DataError, RecipeError, TorchslimError
from torchslim.export.onnx import export_inputs
from torchslim.measure import lowered_agreement
from torchslim.measure.predict import Inputs, Predictor, torch_predictor
from torchslim.registry import same_definition


class Task:
    name: ClassVar[str] = ""
    metric: ClassVar[str] = ""  # the task metric in every stage's metrics (report "task_metric")
    higher_is_better: ClassVar[bool] = True
    # what the task offers stages that need it (a stage's `needs`): "labels" (a supervised loss on
    # labelled training data), "classifier" (logits over classes: the planner, logit distillation)
    provides: ClassVar[frozenset] = frozenset()
    # measure.tolerance of the export check scaled by the largest output (large outputs such as a
    # language model's logits, where float32 rounding alone exceeds an absolute 1e-4)
    relative_tolerance: ClassVar[bool] = False
    # the task reads a Hugging Face model (`model: {hf: ...}`) and text (`data: {builtin: text}`)
    text_model: ClassVar[bool] = False
    # what the `distill` stage does on this task (teacher, student, output term, feature terms, report):
    # a torchslim.distill.setup.DistillSetup subclass; default: logit distillation of a classifier
    distillation: ClassVar[type] = LogitDistillation

    def __init__(self, recipe, search_dir: Path | None = None):
        self.recipe, self.search_dir = recipe, search_dir

    @classmethod
    def check_data(cls, data) -> str | None:
        """What the recipe's `data` block asks that this task cannot do (None: nothing); the recipe
        validator reports it."""
        return None

    # ------------------------------------------------------------------ model and data
    def setup(self) -> nn.Module:
        """Load the data and build the recipe's model; returns the model (the baseline)."""
        raise NotImplementedError

    def architecture(self) -> dict:
        """How to rebuild the recipe's model: {"model": spec, "ops": []}; stages append structural ops."""
        return {"model": self.recipe.model.model_dump(mode="json", exclude={"checkpoint"}), "ops": []}

    def rebuild(self, architecture: dict) -> nn.Module:
        """A model with the structure of an architecture record (weights are loaded over it on resume)."""
        raise NotImplementedError

    def train_set(self) -> Dataset:
        """What training stages iterate over (fine-tuning, QAT); each item a tuple the loss takes."""
        raise NotImplementedError

    def loss(self, label_smoothing: float = 0.0) -> Callable:
        """`loss_fn(model, batch) -> (loss, {part: value})` for the one training loop."""
        raise NotImplementedError

    def validate(self, model: nn.Module) -> float:
        """The validation metric of a PyTorch model (larger = better): early stopping, best epoch."""
        return self.score(torch_predictor(model))

    def score(self, predict: Predictor, samples: int | None = None) -> float:
        """The validation metric (larger = better) of any predictor on (at most `samples` of) the
        validation data: what quantization fallback and the planner optimise."""
        raise NotImplementedError

    def evaluate(self, predict: Predictor) -> dict:
        """The test metrics of a predictor on the held-out data; must hold `self.metric`."""
        raise NotImplementedError

    def example(self, n: int) -> Inputs:
        """`n` real held-out inputs (repeated if there are fewer), as the model's argument tuple."""
        raise NotImplementedError

    def calibration(self, batches: int, batch_size: int) -> list[Inputs]:
        """Real training inputs for calibration, the same ones for the same seed."""
        raise NotImplementedError

    def check(self, model: nn.Module) -> None:
        """Raise a DataError when model and data do not fit together."""
        x = self.example(2)
        try:
            with torch.inference_mode():
                model.eval()(*x)
        except Exception as exc:  # any failure here means model and data do not fit together
            shapes = list(x[0].shape) if len(x) == 1 else [list(t.shape) for t in x]
            raise DataError(
                f"The model cannot take the data's input of shape {shapes}: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}. Check model and data in the "
                "recipe."
            ) from None

    # ------------------------------------------------------------------ the served artifact
    @property
    def input_names(self) -> list[str]:
        return ["input"]

    def dynamic_axes(self) -> list[dict[int, str]]:
        return [{0: "batch"} for _ in self.input_names]

    def export(self, model: nn.Module, path: Path, exporter: str = "dynamo", opset: int = 18) -> Path:
        """The ONNX artifact of `model` (dynamic batch axis), checked to run."""
        return export_inputs(
            model.eval(), path, self.example(2), self.input_names, self.dynamic_axes(), exporter, opset
        )

    def verify_inputs(self, n: int) -> Inputs:
        """The real inputs the ONNX export is checked on against PyTorch (`measure.verify_samples`)."""
        return self.example(n)

    def serving(self, model: nn.Module, path: Path, threads: int) -> dict:
        """Task-specific measurements of the served ONNX artifact beyond the batch latency (a language
        model: prompt prefill and token-by-token decoding with its cache). Default: none."""
        return {}

    def gguf_source(self) -> Path | None:
        """Where a GGUF of the model takes its metadata from: the GGUF file the model was loaded from,
        or its Hugging Face folder (a weight-only stage then also writes a GGUF with its own grids
        where they map onto GGUF types). Default: none."""
        return None

    def feed(self, inputs: Inputs) -> dict:
        return {name: t.numpy() for name, t in zip(self.input_names, inputs)}

    def input_spec(self) -> dict:
        """The report's `input` block: how to feed the artifact."""
        x = self.example(1)
        return {
            "names": self.input_names,
            "shapes": [[None, *t.shape[1:]] for t in x],
            "dtypes": [str(t.dtype).removeprefix("torch.") for t in x],
        }

    def comparison_feeds(self) -> dict[str, dict]:
        """{label: ONNX Runtime feed} for the end-of-run interleaved comparison: real inputs."""
        m = self.recipe.measure
        return {f"batch {n}": self.feed(self.example(n)) for n in (m.compare_batch_sizes or [m.batch_size])}

    def lowered_agreement(self, model: nn.Module, session, path: Path) -> dict:
        """How the lowered artifact's outputs relate to its fake-quant simulation and to the float model
        (`torchslim.measure.lowered_agreement`), on `measure.verify_samples` real inputs."""
        return lowered_agreement(
            model,
            session,
            path,
            self.example(self.recipe.measure.verify_samples),
            self.recipe.data.eval_batch_size,
            self.agreement,
        )

    def agreement(self, reference: np.ndarray, lowered: np.ndarray) -> dict:
        """Task-specific agreement of lowered outputs with the float model's (classification: top-1)."""
        return {}

    def describe(self, metrics: dict) -> str:
        """The task metric for a log line."""
        value = metrics.get(self.metric)
        return f"{self.metric.replace('_', ' ')} {value:.4f}, " if isinstance(value, float) else ""


# ------------------------------------------------------------------------------ registry

_TASKS: dict[str, type[Task]] = {}


def register_task(name: str):
    """Class decorator: `@register_task("regression")` makes `task: regression` usable in recipes."""

    def wrap(cls: type[Task]) -> type[Task]:
        if name in _TASKS and not same_definition(_TASKS[name], cls):
            raise ValueError(f"task '{name}' is registered twice")
        cls.name = name
        _TASKS[name] = cls
        return cls

    return wrap


def task_names() -> list[str]:
    return sorted(_TASKS)


def task_class(task, search_dir: Path | None = None) -> type[Task]:
    """The Task class a recipe's `task` names: a registered name, or {entrypoint: 'module:Class'}."""
    if isinstance(task, str):
        if task not in _TASKS:
            import difflib

            near = difflib.get_close_matches(task, _TASKS, n=1)
            hint = f" Did you mean '{near[0]}'?" if near else ""
            raise RecipeError(
                f"task: unknown task '{task}'.{hint} Tasks: {', '.join(sorted(_TASKS))}, or "
                "{entrypoint: 'module:Class'} for a Task subclass of your own (a recipe's `plugins:` "
                "may register more)."
            )
        return _TASKS[task]
    cls = resolve(task.entrypoint, "task.entrypoint", search_dir)
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise RecipeError(f"task.entrypoint '{task.entrypoint}' is {cls!r}, not a subclass of torchslim.tasks.Task.")
    if not cls.name:
        cls.name = cls.__name__
    if not cls.metric:
        raise RecipeError(
            f"task.entrypoint '{task.entrypoint}': the class must set `metric` (the name of its "
            "task metric, e.g. 'mae')."
        )
    return cls


def make_task(recipe, search_dir: Path | None = None) -> Task:
    return task_class(recipe.task, search_dir)(recipe, search_dir)


def unsupported(task: Task, what: str) -> TorchslimError:
    return TorchslimError(f"task '{task.name}' has no {what}; give the task class a `{what}` method.")
