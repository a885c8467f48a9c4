"""GPT-J (dist_infer/models/gptj.py): partial interleaved RoPE (rotary_dim 8 of head_dim 16),
parallel attention + MLP residual, untied head with a bias. Greedy tokens equal transformers'
at TP x PP in {1, 2}^2, batch 3, in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import pytest
import transformers

from conftest import completions, run_cli, write_prompts
from models.runner import LAYOUTS, VOCAB, InProcessEngine, build_engine, hf_greedy, prompts, widen

NEW = 12
PROMPTS = prompts()


@pytest.fixture(scope="module")
def gptj(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptj")
    config = transformers.GPTJConfig(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256, rotary_dim=8,
                                     bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)
    transformers.set_seed(0)
    model = transformers.GPTJForCausalLM(config).eval()
    widen(model)
    model.save_pretrained(root / "hf")
    return root, model, [hf_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_gptj_greedy_matches_transformers(gptj, tp, pp):
    root, _, refs = gptj
    engine = build_engine(root / "hf", tp, pp, root)
    assert InProcessEngine(engine).greedy(PROMPTS, NEW) == refs


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
    root, _, refs = gptj
    engine = root / "engine-tp2pp2"
    if not engine.exists():
        engine = build_engine(root / "hf", 2, 2, root)
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    outs = completions(run_cli("run", "--engine", str(engine), "--prompts-file", str(path), "--json",
                               "--max-new-tokens", str(NEW), "--ignore-eos", world=4, timeout=240))
    assert [c["output_ids"] for c in outs] == refs
