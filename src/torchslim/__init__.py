"""torchslim: compress trained PyTorch models and prove the result with honest measurements."""

from torchslim.version import __version__  # noqa: E402

from torchslim.data import DataBundle, InputSpec, build_data  # noqa: E402
from torchslim.errors import TorchslimError  # noqa: E402
from torchslim.export import export_onnx, verify_onnx  # noqa: E402
from torchslim.measure import measure  # noqa: E402
from torchslim.models import build_model, load_weights, save_weights  # noqa: E402
from torchslim.pipeline import load_model, run  # noqa: E402
from torchslim.recipe import Recipe, load_recipe, parse_recipe  # noqa: E402
from torchslim.registry import register_stage, stage_names  # noqa: E402
from torchslim.results import Exported, Lowered, Restructured, StageResult  # noqa: E402
from torchslim.tasks import LabelledTask, Task, register_task  # noqa: E402
from torchslim.train import TrainConfig, fit  # noqa: E402

__all__ = ["DataBundle", "Exported", "InputSpec", "LabelledTask", "Lowered", "Recipe", "Restructured", "StageResult",
           "Task", "register_task", "TorchslimError", "TrainConfig", "__version__", "build_data",
           "build_model", "export_onnx", "fit", "load_model", "load_recipe", "load_weights", "measure", "parse_recipe",
           "register_stage", "run", "save_weights", "stage_names", "verify_onnx"]
