"""Mixtral (dist_infer/models/mixtral.py): sparse MoE, 4 experts, top-2 routing, experts split
over TP. Greedy tokens equal transformers' MixtralForCausalLM at TP x PP in {1, 2}^2, batch 3,
in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import pytest
import transformers

from models.runner import LAYOUTS, PROMPTS, VOCAB, greedy_in_process, greedy_under_mpirun, reference



@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixtral")
    config = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                        num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return reference(root, transformers.MixtralForCausalLM, config)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_mixtral_greedy_matches_transformers(mixtral, tp, pp):
    assert greedy_in_process(mixtral, tp, pp) == mixtral[2]


def test_mixtral_routes_to_several_experts(mixtral):
    """Every expert is chosen for some token of the prompts (the test exercises the routing)."""
    import torch

    _, model, _ = mixtral
    chosen = set()
    with torch.no_grad():
        for p in PROMPTS:
            h = model.model.embed_tokens(torch.tensor(p))
            logits = torch.nn.functional.linear(h, model.model.layers[0].mlp.gate.weight)
            chosen |= set(logits.topk(2, dim=-1).indices.flatten().tolist())
    assert chosen == {0, 1, 2, 3}


def test_mixtral_under_mpirun(mixtral, tmp_path):
    assert greedy_under_mpirun(mixtral, tmp_path) == mixtral[2]


def test_gpu_moe_dispatch_equals_the_reference():
    """The GPU kernels' graph-safe MoE (every expert on every token, weighted, zeros elsewhere) gives
    the reference's numbers; checked here on CPU tensors (the op is plain torch)."""
    import torch

    from dist_infer.engine.kernels import REFERENCE, GpuKernels

    torch.manual_seed(0)
    experts = [torch.nn.Linear(16, 16) for _ in range(4)]
    x = torch.randn(7, 16)
    probs = torch.randn(7, 4).softmax(-1)
    weights, chosen = probs.topk(2, dim=-1)
    with torch.no_grad():
        ref = REFERENCE.moe_experts(x, weights, chosen, experts)
        gpu = GpuKernels.moe_experts(object.__new__(GpuKernels), x, weights, chosen, experts)
    torch.testing.assert_close(gpu, ref, rtol=1e-6, atol=1e-6)
