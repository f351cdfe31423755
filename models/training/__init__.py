"""Training and export of the learned codec's network (torch, onnx): never imported when serving.

Why a sub-package: the node's serving path (`compacs.models` above) must start and code without
torch installed. These modules may import the serving side (features, entropy tables, runtime)
but nothing on the serving side imports them. `data` (the real images from the registries)
lives here because training is its main user; the benchmarks and tests read it too.
"""
