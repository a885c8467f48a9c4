"""Real model shapes for benchmarks (HF LlamaConfig kwargs); weights are random."""

# HF config kwargs of real model shapes (weights are random).
PRESETS = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    # For tests: seconds on a CPU; heads chosen so TP=2 (and kv-head replication at TP=4) work.
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}


def preset_hf_config(name: str, **overrides):
    """A transformers LlamaConfig of preset `name`; `overrides` replace its kwargs
    (vocab_size, bos_token_id, eos_token_id, ...). No bos/eos/pad unless given."""
    from transformers import LlamaConfig

    from dist_infer.errors import LaunchError

    if name not in PRESETS:
        raise LaunchError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
    kwargs = {**PRESETS[name], "bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **overrides}
    return LlamaConfig(**kwargs)
