"""Baichuan2-7B (dist_infer/models/baichuan.py), whose modeling code transformers lacks: the
test writes its checkpoint layout (config.json `model_type: baichuan`, fused `W_pack`, an
un-normalised NormHead `lm_head`) from a transformers Llama's tensors, and compares with that
Llama whose head rows are normalised, as Baichuan's NormHead does before use. Greedy tokens
at TP x PP in {1, 2}^2, batch 3, in process; once under a real mpirun at TP=2 x PP=2."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import save_file

from dist_infer.errors import CheckpointError
from models.runner import LAYOUTS, VOCAB, build_engine, greedy_in_process, greedy_under_mpirun, reference



def baichuan_checkpoint(directory, llama) -> None:
    """Baichuan2-7B's layout from a Llama: W_pack = [q; k; v], head rows scaled (un-normalised)."""
    state = {k: v.clone().contiguous() for k, v in llama.state_dict().items()}
    for i in range(llama.config.num_hidden_layers):
        qkv = [state.pop(f"model.layers.{i}.self_attn.{p}_proj.weight") for p in "qkv"]
        state[f"model.layers.{i}.self_attn.W_pack.weight"] = torch.cat(qkv)
    g = torch.Generator().manual_seed(5)
    state["lm_head.weight"] = state["lm_head.weight"] * (0.5 + 3 * torch.rand(VOCAB, 1, generator=g))
    directory.mkdir(parents=True)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    c = llama.config
    (directory / "config.json").write_text(json.dumps({
        "architectures": ["BaichuanForCausalLM"], "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig"},
        "model_type": "baichuan", "vocab_size": VOCAB, "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size, "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "hidden_act": "silu", "max_position_embeddings": 256,
        "model_max_length": 256, "rms_norm_eps": c.rms_norm_eps, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "torch_dtype": "float32"}))
    with torch.no_grad():  # the reference: NormHead's rows, normalised once
        llama.lm_head.weight.copy_(torch.nn.functional.normalize(state["lm_head.weight"], dim=1))


@pytest.fixture(scope="module")
def baichuan(tmp_path_factory):
    root = tmp_path_factory.mktemp("baichuan")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return reference(root, transformers.LlamaForCausalLM, config, save=baichuan_checkpoint)


@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
def test_baichuan_greedy_matches_llama_with_normalised_head(baichuan, tp, pp):
    assert greedy_in_process(baichuan, tp, pp) == baichuan[2]


def test_baichuan_partition_writes_llama_names_and_unit_head(baichuan):
    from safetensors import safe_open

    root = baichuan[0]
    ckpt = root / "ckpt-tp2pp1"
    if not ckpt.exists():
        build_engine(root / "hf", 2, 1, root)
    meta = json.loads((ckpt / "config.json").read_text())
    assert meta["model"]["architecture"] == "baichuan"
    with safe_open(ckpt / "rank1.safetensors", "pt") as f:
        assert "model.layers.0.self_attn.k_proj.weight" in f.keys()
        assert not any("W_pack" in k for k in f.keys())
        head = f.get_tensor("lm_head.weight")  # rows 151..301 of the vocabulary, then one padding row
    norms = head[: VOCAB - 151].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))


def test_baichuan_13b_alibi_refused(tmp_path):
    from dist_infer.models.baichuan import read_config

    with pytest.raises(CheckpointError, match="ALiBi"):
        read_config({"model_type": "baichuan", "hidden_size": 5120, "num_hidden_layers": 40})


def test_baichuan_under_mpirun(baichuan, tmp_path):
    assert greedy_under_mpirun(baichuan, tmp_path) == baichuan[2]
