"""Built-in model zoo, user models through entry points, and safe weight loading."""

from torchslim.models.io import build_model, load_weights, save_weights
from torchslim.models.zoo import CNN, MLP, MODELS, cnn_student, cnn_teacher, mlp_student, mlp_teacher

__all__ = [
    "CNN",
    "MLP",
    "MODELS",
    "build_model",
    "cnn_student",
    "cnn_teacher",
    "load_weights",
    "mlp_student",
    "mlp_teacher",
    "save_weights",
]
