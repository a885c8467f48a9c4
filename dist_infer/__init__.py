"""dist_infer: distributed multi-GPU, multi-node LLM inference."""

__version__ = "0.1.0"
