"""GGUF files: the model spec and memory-mapped tensors, the tokenizer, the chat template."""

from workbench.gguf.reader import GGUFModel, ModelSpec, Tensor, read_gguf

__all__ = ["GGUFModel", "ModelSpec", "Tensor", "read_gguf"]
