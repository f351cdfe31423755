"""Learned codec (later issues): models, training, ONNX export."""
