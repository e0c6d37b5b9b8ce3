"""Export targets: ONNX (numerically verified) and safetensors weights."""

from torchslim.export.onnx import export_onnx, onnx_outputs, verify_onnx
from torchslim.models.io import save_weights

__all__ = ["export_onnx", "onnx_outputs", "save_weights", "verify_onnx"]
