"""Tasks: what kind of model a recipe compresses (see `torchslim.tasks.base`). Built in:
`classification` and `embedding`; a user's task subclasses `Task` (or `LabelledTask` for data of
(input, target) pairs) and is named in a recipe by entry point or registered by a plugin."""

from torchslim.measure.predict import Predictor, onnx_predictor, torch_predictor

# the built-in tasks register themselves with @register_task when imported; importing them here, in the
# package every use of a task goes through, is the whole discovery mechanism (no scanning)
from torchslim.tasks import causal_lm, classification, embedding  # noqa: F401
from torchslim.tasks.base import Task, make_task, register_task, task_class, task_names
from torchslim.tasks.labelled import LabelledTask

__all__ = [
    "Task",
    "LabelledTask",
    "Predictor",
    "register_task",
    "make_task",
    "task_class",
    "task_names",
    "torch_predictor",
    "onnx_predictor",
]
