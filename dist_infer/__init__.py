"""dist_infer: distributed multi-GPU, multi-node LLM inference."""

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "KVCacheConfig"]


def __getattr__(name: str):
    # Lazy: `import dist_infer` (the CLI, every rank) must not import torch for nothing.
    if name == "LLM":
        from dist_infer.llm import LLM

        return LLM
    if name == "SamplingParams":
        from dist_infer.engine.sampling import SamplingParams

        return SamplingParams
    if name == "KVCacheConfig":
        from dist_infer.config import KVCacheConfig

        return KVCacheConfig
    raise AttributeError(f"module 'dist_infer' has no attribute {name!r}")
