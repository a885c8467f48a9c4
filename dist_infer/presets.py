"""Real model shapes for benchmarks (HF config kwargs); weights are random."""

# Mixtral 8x7B's shape (HF mistralai/Mixtral-8x7B-v0.1 config.json): 46.7B parameters, 93.4 GB in bf16.
_MIXTRAL_8X7B = dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                     max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-5, tie_word_embeddings=False,
                     num_local_experts=8, num_experts_per_tok=2, sliding_window=None)

# HF config kwargs of real model shapes (weights are random); model_type picks the config class
# (default llama).
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
    # Fits one H200 (141 GB) with its KV cache, not an 80 GB H100: there take the 16-layer one.
    "mixtral-8x7b": _MIXTRAL_8X7B,
    # Mixtral 8x7B's layers, half of them (47.0 GB in bf16): each layer and step as in the full
    # model, on one H100; per-token times are about half the full model's.
    "mixtral-8x7b-16l": {**_MIXTRAL_8X7B, "num_hidden_layers": 16},
    # For tests: seconds on a CPU; heads chosen so TP=2 (and kv-head replication at TP=4) work.
    "tiny-llama": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
    "tiny-mixtral": dict(model_type="mixtral", vocab_size=512, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=10000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2, sliding_window=None),
}


def preset_hf_config(name: str, **overrides):
    """A transformers config of preset `name` (LlamaConfig, MixtralConfig, ...); `overrides`
    replace its kwargs (vocab_size, bos_token_id, eos_token_id, ...). No bos/eos/pad unless given."""
    from transformers import AutoConfig

    from dist_infer.errors import LaunchError

    if name not in PRESETS:
        raise LaunchError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}.")
    kwargs = {"model_type": "llama", **PRESETS[name], "bos_token_id": None, "eos_token_id": None,
              "pad_token_id": None, **overrides}
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)
