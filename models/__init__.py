"""The learned codec's serving runtime: the shipped model, its features, coding tables and decoders.

Why the split: the node serves the learned codec with ONNX Runtime, numpy and constriction only;
torch (hundreds of MB, seconds to import) is for training and export, which live in
`compacs.models.training`. Nothing imported here may import torch or the training package
(tests/test_serving_imports.py checks it in a clean interpreter).
"""
