"""GPT-2 (dist_infer/models/gpt2.py): greedy tokens equal transformers' at TP x PP in {1, 2}^2,
batch 3, in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import pytest
import transformers

from conftest import completions, run_cli, write_prompts
from models.runner import LAYOUTS, VOCAB, InProcessEngine, build_engine, hf_greedy, prompts, widen

NEW = 12
PROMPTS = prompts()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4, n_positions=256,
                                     bos_token_id=None, eos_token_id=None, tie_word_embeddings=True)
    transformers.set_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    widen(model)
    model.save_pretrained(root / "hf")
    return root, model, [hf_greedy(model, p, NEW) for p in PROMPTS]


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_gpt2_greedy_matches_transformers(gpt2, tp, pp):
    root, _, refs = gpt2
    engine = build_engine(root / "hf", tp, pp, root)
    assert InProcessEngine(engine).greedy(PROMPTS, NEW) == refs


def test_gpt2_config_and_weights(gpt2):
    from dist_infer.config import ModelConfig

    cfg = ModelConfig.from_hf(gpt2[1].config)
    assert (cfg.norm, cfg.activation, cfg.position_embedding, cfg.gated_mlp) == ("layer", "gelu_tanh", "learned", False)
    assert cfg.tie_word_embeddings and cfg.qkv_bias and cfg.rope_inv_freq == ()
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_gpt2_under_mpirun(gpt2, tmp_path):
    root, _, refs = gpt2
    engine = root / "engine-tp2pp2"
    if not engine.exists():
        engine = build_engine(root / "hf", 2, 2, root)
    path = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    outs = completions(run_cli("run", "--engine", str(engine), "--prompts-file", str(path), "--json",
                               "--max-new-tokens", str(NEW), "--ignore-eos", world=4, timeout=240))
    assert [c["output_ids"] for c in outs] == refs
