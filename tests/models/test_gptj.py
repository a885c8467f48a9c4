"""GPT-J (dist_infer/models/gptj.py): partial interleaved RoPE (rotary_dim 8 of head_dim 16),
parallel attention + MLP residual, untied head with a bias. Greedy tokens equal transformers'
at TP x PP in {1, 2}^2, batch 3, in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import pytest
import transformers

from models.runner import LAYOUTS, NEW, PROMPTS, VOCAB, greedy_in_process, greedy_under_mpirun, hf_greedy, reference



@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptj")
    config = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8,
                                     bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    return reference(root, transformers.GPTJForCausalLM, config)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_gptj_greedy_matches_transformers(gptj, tp, pp):
    assert greedy_in_process(gptj, tp, pp) == gptj[2]


def test_gptj_config(gptj):
    from dist_infer.config import ModelConfig

    cfg = ModelConfig.from_hf(gptj[1].config)
    assert (cfg.rotary_dim, cfg.rope_interleaved, cfg.parallel_residual, cfg.lm_head_bias) == (8, True, True, True)
    assert len(cfg.rope_inv_freq) == 4 and not cfg.tie_word_embeddings


def test_gptj_partial_rope_matters(gptj):
    """The reference depends on rotary_dim: a model that turned every dim would decode otherwise
    (so the exactness above exercises the partial, interleaved rotation)."""
    root, model, refs = gptj
    full = transformers.GPTJForCausalLM(transformers.GPTJConfig(**{**model.config.to_dict(), "rotary_dim": 16})).eval()
    full.load_state_dict(model.state_dict())
    assert [hf_greedy(full, p, NEW) for p in PROMPTS] != refs


def test_gptj_under_mpirun(gptj, tmp_path):
    assert greedy_under_mpirun(gptj, tmp_path) == gptj[2]
