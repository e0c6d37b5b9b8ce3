"""torchslim: compress trained PyTorch models and prove the result with honest measurements."""

# What registers itself at import is loaded here, at the top, in one place (no scanning, no import
# inside a registry): the built-in stages (`stages`, each module decorated with @register_stage; a
# recipe's `plugins:` add more) and the layer classes a saved model may swap in on load
# (`register_shape_attrs` in lowrank.layers and models.attention). torchslim.tasks imports the
# built-in tasks the same way.
from torchslim import stages  # noqa: F401
from torchslim.data import DataBundle, InputSpec, build_data
from torchslim.errors import TorchslimError
from torchslim.export import export_onnx, verify_onnx
from torchslim.lowrank import layers as _lowrank_layers  # noqa: F401
from torchslim.measure import measure
from torchslim.models import attention as _attention  # noqa: F401
from torchslim.models import build_model, load_weights, save_weights
from torchslim.pipeline import load_model, run
from torchslim.recipe import Recipe, load_recipe, parse_recipe
from torchslim.registry import register_stage, stage_names
from torchslim.results import Exported, Lowered, Restructured, StageResult
from torchslim.tasks import LabelledTask, Task, register_task
from torchslim.train import TrainConfig, fit
from torchslim.version import __version__

__all__ = [
    "DataBundle",
    "Exported",
    "InputSpec",
    "LabelledTask",
    "Lowered",
    "Recipe",
    "Restructured",
    "StageResult",
    "Task",
    "register_task",
    "TorchslimError",
    "TrainConfig",
    "__version__",
    "build_data",
    "build_model",
    "export_onnx",
    "fit",
    "load_model",
    "load_recipe",
    "load_weights",
    "measure",
    "parse_recipe",
    "register_stage",
    "run",
    "save_weights",
    "stage_names",
    "verify_onnx",
]
