"""The grouped MoE kernels (engine/moe_gpu.py) behind `GpuKernels.moe_experts`.

On the GPU (`pytest -m gpu`): against the reference (ReferenceKernels.moe_experts in float32)
at Mixtral 8x7B's TP-local shapes (H 4096, I 14336 / tp for tp 1, 2, 8), k=2 of E=8, N in
{1, 2, 8}, bf16 and float32; only the chosen experts' weights are read (the others hold NaN);
replayed from a CUDA graph with new routing; the seam picks the kernels by shape, the dense
path past 2E picks and with DIST_INFER_MOE_KERNEL=0; a tiny Mixtral engine's greedy tokens
(CUDA graphs, float32) equal transformers', with the kernels and without.

On CPU (CI): the shape rule, the switch and which experts the kernels take, and one small
check of the kernels under Triton's interpreter (TRITON_INTERPRET=1, in a subprocess).
"""

from __future__ import annotations

import copy
import math
import types

import pytest
import torch

from conftest import run_under_triton_interpreter
from dist_infer.engine.kernels import REFERENCE
from dist_infer.engine.layers import GatedMLP
from dist_infer.errors import EngineError

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def make_experts(hidden: int, inter: int, tp: int, num_experts: int, dtype, device="cpu", bias=False, seed=0):
    """E SiLU-gated experts as SparseMoE holds them: this TP rank's [2I/tp, H] and [H, I/tp] slices."""
    cfg = types.SimpleNamespace(hidden_size=hidden, intermediate_size=inter, mlp_bias=bias)
    tp_group = types.SimpleNamespace(size=tp)
    with torch.device(device):
        experts = torch.nn.ModuleList(GatedMLP(cfg, tp_group, dtype, reduce=False) for _ in range(num_experts))
    gen = torch.Generator(device).manual_seed(seed)
    for p in experts.parameters():
        p.data.normal_(0.0, 1.0 / math.sqrt(p.shape[-1]), generator=gen)  # unit-scale outputs at any size
    return experts


def routing(tokens: int, hidden: int, num_experts: int, top_k: int, dtype, device="cpu", seed=0):
    """x [N, H], Mixtral's routing: weights [N, k] (float32, renormalised) of the chosen experts [N, k]."""
    gen = torch.Generator(device).manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen, device=device).to(dtype)
    probs = torch.randn(tokens, num_experts, generator=gen, device=device).softmax(-1)
    weights, chosen = probs.topk(top_k, dim=-1)
    return x, weights / weights.sum(-1, keepdim=True), chosen


def reference(x, weights, chosen, experts):
    """ReferenceKernels.moe_experts in float32 (on float32 copies of bf16 experts)."""
    if experts[0].gate_up_proj.weight.dtype != torch.float32:
        experts = copy.deepcopy(experts).float()
    with torch.no_grad():
        return REFERENCE.moe_experts(x.float(), weights, chosen, experts)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# ---------------------------------------------------------------- CPU: the rule, the switch, the interpreter


def test_grouped_kernels_take_decode_sizes_only():
    from dist_infer.engine.moe_gpu import use_grouped_kernel

    assert [n for n in (1, 2, 4, 8, 16, 64) if use_grouped_kernel(n, 2, 8)] == [1, 2, 4, 8]  # N*k <= 2E
    assert use_grouped_kernel(16, 1, 8) and not use_grouped_kernel(17, 1, 8) and not use_grouped_kernel(0, 2, 8)


def test_switch_reads_zero_one_and_refuses_anything_else(monkeypatch):
    from dist_infer.engine.moe_gpu import kernel_enabled

    monkeypatch.delenv("DIST_INFER_MOE_KERNEL", raising=False)
    assert kernel_enabled()
    monkeypatch.setenv("DIST_INFER_MOE_KERNEL", "0")
    assert not kernel_enabled()
    monkeypatch.setenv("DIST_INFER_MOE_KERNEL", "yes")
    with pytest.raises(EngineError, match="DIST_INFER_MOE_KERNEL='yes': use 1 .* or 0"):
        kernel_enabled()


def test_kernels_take_dense_experts_in_the_step_dtype_only():
    from dist_infer.engine.moe_gpu import grouped_kernel_weights

    experts = make_experts(32, 64, 1, 4, torch.float32)
    x, _, chosen = routing(2, 32, 4, 2, torch.float32)
    pairs = grouped_kernel_weights(x, chosen, experts)
    assert [(g.shape, d.shape) for g, d in pairs] == [((128, 32), (32, 64))] * 4
    assert grouped_kernel_weights(x.half(), chosen, experts) is None                                # dtype differs
    assert grouped_kernel_weights(x, chosen, make_experts(32, 64, 1, 4, torch.float32, bias=True)) is None
    experts[1].down_proj.method = types.SimpleNamespace(mode="int8_wo")                             # quantized
    assert grouped_kernel_weights(x, chosen, experts) is None
    x5, _, chosen5 = routing(5, 32, 4, 2, torch.float32)
    assert grouped_kernel_weights(x5, chosen5, make_experts(32, 64, 1, 4, torch.float32)) is None   # 10 > 2E picks


def test_mixtral_presets_make_random_mixtral_engines(tmp_path):
    """`bench --model mixtral-8x7b[-16l]` and `build --random-weights` read Mixtral presets as
    Mixtral (top-2 of 8 experts), and the Llama presets stay Llama."""
    from dist_infer.config import BuildConfig, ModelConfig
    from dist_infer.engine.random_engine import build_random_engine
    from dist_infer.engine.runtime import EngineSpec
    from dist_infer.presets import preset_hf_config

    full, half = (ModelConfig.from_hf(preset_hf_config(n)) for n in ("mixtral-8x7b", "mixtral-8x7b-16l"))
    assert (full.architecture, full.num_layers, half.num_layers, full.num_experts, full.experts_per_token) == \
        ("mixtral", 32, 16, 8, 2)
    assert round(full.num_params() / 1e9, 1) == 46.7
    assert ModelConfig.from_hf(preset_hf_config("llama-3-8b")).architecture == "llama"
    engine = build_random_engine("tiny-mixtral", tmp_path / "e", build=BuildConfig(dtype="float32", max_seq_len=64),
                                 with_tokenizer=False, device="cpu")
    spec = EngineSpec.read(engine)
    assert (spec.model.architecture, spec.model.num_experts, spec.model.experts_per_token) == ("mixtral", 8, 2)


def test_bench_counts_the_expert_bytes_a_decode_step_needs():
    """MBU's bytes: every weight but the experts a step is not expected to choose (uniform routing)."""
    from dist_infer.bench import expert_read_fraction, weight_bytes_read
    from dist_infer.comm.base import LocalCommunicator
    from dist_infer.config import Mapping, ModelConfig
    from dist_infer.engine.model import StageModel
    from dist_infer.presets import preset_hf_config

    cfg = ModelConfig.from_hf(preset_hf_config("tiny-mixtral"))
    with torch.device("meta"):
        model = StageModel(cfg, Mapping(1, 1), LocalCommunicator(), cfg.vocab_size, torch.float32)
    total = sum(p.numel() * 4 for p in model.parameters())
    experts = sum(p.numel() * 4 for n, p in model.named_parameters() if ".experts." in n)
    assert experts == 2 * 8 * 3 * 64 * 128 * 4  # layers x experts x (gate, up, down) x H x I x 4 bytes
    assert weight_bytes_read(model, cfg, 1) == total - 0.75 * experts        # 2 of 8 experts
    assert expert_read_fraction(cfg, 8) == pytest.approx(1 - 0.75 ** 8)
    llama = ModelConfig.from_hf(preset_hf_config("tiny-llama"))
    assert expert_read_fraction(llama, 1) == 1.0


INTERPRETED = r"""
import torch
from engine.test_moe_gpu import make_experts, reference, rel_err, routing
from dist_infer.engine import moe_gpu as moe

tables = moe.ExpertTableCache()
small = moe.MoeLaunchConfig(block_i=32, block_h=32, block_out=32, block_k=16, split_k=2)
for tokens, hidden, inter, tp, config in ((1, 32, 64, 1, None), (3, 40, 96, 2, small)):
    experts = make_experts(hidden, inter, tp, 8, torch.float32, seed=tokens)
    x, weights, chosen = routing(tokens, hidden, 8, 2, torch.float32, seed=tokens)
    unchosen = sorted(set(range(8)) - set(chosen.flatten().tolist()))
    expected = reference(x, weights, chosen, experts)
    for e in unchosen:
        for p in experts[e].parameters():
            p.data.fill_(float("nan"))
    got = moe.moe_grouped(x, weights, chosen, tables.get(moe.dense_weights(experts)), config)
    assert got.shape == (tokens, hidden) and unchosen and rel_err(got, expected) < 1e-5, (tokens, unchosen)
print("ok")
"""


def test_kernels_under_triton_interpreter_match_reference():
    """float32, E=8 top-2: one token (two slots), and three tokens at a TP=2 slice (I=48) with
    small tiles (partial H and I tiles, a down projection split in two, the second short); the
    experts no token chose hold NaN, which the kernels must never read. In a subprocess:
    TRITON_INTERPRET must be set before triton is imported."""
    pytest.importorskip("triton")
    run_under_triton_interpreter(INTERPRETED, timeout=120)


# ---------------------------------------------------------------- GPU


@pytest.fixture(scope="module")
def mixtral_layer_experts():
    """Mixtral 8x7B's experts at TP-local sizes, made once per (tp, dtype)."""
    made = {}

    def get(tp, dtype):
        if (tp, dtype) not in made:
            made.clear()  # one layer's experts at a time (2.8 GB in bf16 at tp=1)
            torch.cuda.empty_cache()
            made[tp, dtype] = make_experts(4096, 14336, tp, 8, dtype, device="cuda", seed=tp)
        return made[tp, dtype]

    return get


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("tp", [1, 2, 8])
@pytest.mark.parametrize("tokens", [1, 2, 8])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_kernels_match_reference_at_mixtral_shapes(mixtral_layer_experts, tokens, tp, dtype):
    from dist_infer.engine import moe_gpu

    experts = mixtral_layer_experts(tp, dtype)
    x, weights, chosen = routing(tokens, 4096, 8, 2, dtype, device="cuda", seed=tokens)
    got = moe_gpu.moe_grouped(x, weights, chosen, moe_gpu.ExpertTableCache().get(moe_gpu.dense_weights(experts)))
    assert got.dtype == dtype and got.shape == (tokens, 4096)
    assert rel_err(got, reference(x, weights, chosen, experts)) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seam_reads_only_chosen_experts_at_decode_and_every_expert_past_it(monkeypatch):
    """NaN in the experts no token chose: the kernels' output stays finite (never read); the dense
    path (16 tokens: 32 > 2E picks, or the switch off) multiplies them by 0 and gets NaN."""
    from dist_infer.engine.kernels import GpuKernels

    experts = make_experts(256, 512, 1, 8, torch.bfloat16, device="cuda")
    x, weights, chosen = routing(16, 256, 8, 2, torch.bfloat16, device="cuda")
    chosen[:, 0], chosen[:, 1] = 2, 5  # every token picks experts 2 and 5
    expected = reference(x, weights, chosen, experts)
    for e in set(range(8)) - {2, 5}:
        for p in experts[e].parameters():
            p.data.fill_(float("nan"))
    monkeypatch.delenv("DIST_INFER_MOE_KERNEL", raising=False)
    kernels = GpuKernels()
    with torch.no_grad():
        for n in (1, 2, 8):
            assert rel_err(kernels.moe_experts(x[:n], weights[:n], chosen[:n], experts), expected[:n]) < 1e-2
        assert kernels.moe_experts(x, weights, chosen, experts).isnan().any()  # 16 tokens: dense
        monkeypatch.setenv("DIST_INFER_MOE_KERNEL", "0")
        assert GpuKernels().moe_experts(x[:1], weights[:1], chosen[:1], experts).isnan().any()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_kernels_replay_from_a_cuda_graph_with_new_routing():
    from dist_infer.engine import moe_gpu

    experts = make_experts(4096, 14336 // 2, 1, 8, torch.bfloat16, device="cuda")
    tables = moe_gpu.ExpertTableCache().get(moe_gpu.dense_weights(experts))
    x, weights, chosen = routing(4, 4096, 8, 2, torch.bfloat16, device="cuda", seed=0)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        moe_gpu.moe_grouped(x, weights, chosen, tables)  # warm-up: compiles
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            out = moe_gpu.moe_grouped(x, weights, chosen, tables)
    torch.cuda.current_stream().wait_stream(stream)
    for seed in (1, 2, 3):  # new tokens and routing in the same buffers, then replay
        new_x, new_weights, new_chosen = routing(4, 4096, 8, 2, torch.bfloat16, device="cuda", seed=seed)
        x.copy_(new_x), weights.copy_(new_weights), chosen.copy_(new_chosen)
        graph.replay()
        torch.cuda.synchronize()
        assert rel_err(out, reference(new_x, new_weights, new_chosen, experts)) < 1e-2, seed


def _graph_ms(fn, reps: int = 20) -> float:
    """Device time of one replay of fn captured in a CUDA graph (launch gaps excluded, as in decode)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_kernels_beat_every_expert_at_batch_1(mixtral_layer_experts, capsys):
    """One Mixtral 8x7B layer's experts (bf16, tp=1): at one token the kernels read 2 of 8 experts,
    so they must take under half the dense path's time. Prints both times and the kernels'
    bandwidth at 1, 2, 4 and 8 tokens (pytest -s) for tuning PICKS_PER_EXPERT and the tiles."""
    from dist_infer.engine import moe_gpu
    from dist_infer.engine.kernels import GpuKernels

    experts = mixtral_layer_experts(1, torch.bfloat16)
    tables = moe_gpu.ExpertTableCache().get(moe_gpu.dense_weights(experts))
    expert_bytes = sum(p.numel() * p.element_size() for p in experts[0].parameters())
    ratios = {}
    with torch.no_grad():
        for tokens in (1, 2, 4, 8):
            x, weights, chosen = routing(tokens, 4096, 8, 2, torch.bfloat16, device="cuda", seed=tokens)
            grouped = _graph_ms(lambda: moe_gpu.moe_grouped(x, weights, chosen, tables))
            dense = _graph_ms(lambda: GpuKernels._moe_every_expert(x, weights, chosen, experts))
            distinct = len(set(chosen.flatten().tolist()))
            ratios[tokens] = grouped / dense
            with capsys.disabled():
                print(f"\nMixtral layer experts, {tokens} tokens ({distinct} experts chosen): grouped {grouped:.3f} ms "
                      f"({distinct * expert_bytes / grouped / 1e6:.0f} GB/s), every expert {dense:.3f} ms "
                      f"({8 * expert_bytes / dense / 1e6:.0f} GB/s)")
    assert ratios[1] < 0.5, ratios


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("switch", ["1", "0"], ids=["grouped", "dense"])
def test_tiny_mixtral_engine_on_gpu_matches_transformers(tmp_path, switch):
    """float32, E=8 top-2, CUDA graphs: three sequences decode in the 4-row graph (8 picks <= 2E:
    the grouped kernels), prefill runs the dense path; greedy tokens equal transformers'."""
    import transformers

    from conftest import completions, run_cli, write_prompts
    from models.runner import hf_greedy, widen

    config = transformers.MixtralConfig(vocab_size=301, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
                                        num_local_experts=8, num_experts_per_tok=2, tie_word_embeddings=False,
                                        bos_token_id=None, eos_token_id=None, pad_token_id=None)
    transformers.set_seed(0)
    model = transformers.MixtralForCausalLM(config).eval()
    widen(model)
    model.save_pretrained(tmp_path / "hf")
    prompts = [[5, 17, 33, 2, 99, 100, 7], [8, 9, 10], list(range(40, 75))]
    assert run_cli("partition", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                   "--quiet").returncode == 0
    proc = run_cli("build", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine"),
                   "--dtype", "float32", "--max-batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", "--engine", str(tmp_path / "engine"), "--prompts-file",
                   str(write_prompts(tmp_path / "p.jsonl", prompts)), "--json", "--ignore-eos", "--max-new-tokens",
                   "24", "--device", "cuda", env={**NCCL_ENV, "DIST_INFER_MOE_KERNEL": switch}, timeout=300)
    assert [c["output_ids"] for c in completions(proc)] == [hf_greedy(model, p, 24) for p in prompts]
