"""Tasks: what kind of model a recipe compresses (see `torchslim.tasks.base`). Built in:
`classification` and `embedding`; a user's task subclasses `Task` (or `LabelledTask` for data of
(input, target) pairs) and is named in a recipe by entry point or registered by a plugin."""

from torchslim.tasks.base import (Predictor, Task, make_task, onnx_predictor, register_task, task_class, task_names,
                                  torch_predictor)
from torchslim.tasks.labelled import LabelledTask

__all__ = ["Task", "LabelledTask", "Predictor", "register_task", "make_task", "task_class", "task_names",
           "torch_predictor", "onnx_predictor"]
