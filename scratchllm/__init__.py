"""scratchllm: build a large language model from scratch, end to end, on PyTorch."""

__version__ = "0.1.0"
