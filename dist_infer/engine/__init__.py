"""Model, parallel layers, KV cache, sampling; engine build and load."""
