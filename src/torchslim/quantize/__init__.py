"""Quantization: observers and calibration, lowering to ONNX Runtime int8/int4/fp16 artifacts."""
