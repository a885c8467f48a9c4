"""GPU engine tests: run on the device machine (`pytest -m gpu`); skipped where
no CUDA GPU is visible. Multi-GPU cases need 2 GPUs and nccl4py."""

from __future__ import annotations

import os
import time

import pytest
import torch

from conftest import completions, hf_greedy, make_tiny_model, run_cli, write_prompts
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch, paged_attention_reference

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}
needs_2_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")


def _random_paged_batch(lengths, page, kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    blocks_needed = sum(-(-n // page) for n in lengths)
    cache = PagedKVCache(1, blocks_needed + 8, page, kv_heads, head_dim, dtype, device)
    cache.k.normal_(generator=torch.Generator(device).manual_seed(seed))
    cache.v.normal_(generator=torch.Generator(device).manual_seed(seed + 1))
    free = torch.randperm(blocks_needed + 7, generator=gen)[: blocks_needed].add(1).tolist()  # scattered, never block 0
    seqs = []
    for n in lengths:
        table, free = free[: -(-n // page)], free[-(-n // page):]
        seqs.append(([0], n - 1, table))  # one decode token at position n-1
    return cache, StepBatch.build(seqs, page, device)


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (8, 8, 64), (16, 1, 128)])
@pytest.mark.parametrize("window", [None, 40])
def test_triton_decode_matches_reference(heads, kv_heads, head_dim, window):
    from dist_infer.engine.attention_gpu import paged_decode_attention

    lengths = [1, 17, 64, 200, 513]
    cache, batch = _random_paged_batch(lengths, 16, kv_heads, head_dim, torch.bfloat16, "cuda")
    q = torch.randn(len(lengths), heads, head_dim, dtype=torch.bfloat16, device="cuda")
    scale = head_dim ** -0.5
    out = paged_decode_attention(q, cache.k[0], cache.v[0], batch.block_tables, batch.context_lens_tensor, 16,
                                 scale, window)
    ref = paged_attention_reference(q.float(), _as_float(cache), 0, batch, scale, window)
    err = (out.float() - ref).norm() / ref.norm()
    assert err < 1e-2, f"relative error {err:.2e} (bf16 operands: expect ~3e-3)"


def _ragged_step(rows, page):
    """rows: (tokens in cache after the step, new tokens this step) per sequence, over
    consecutive blocks from 1 (the order _random_paged_batch filled)."""
    seqs, next_block = [], 1
    for ctx, new in rows:
        n_blocks = -(-ctx // page)
        seqs.append(([0] * new, ctx - new, list(range(next_block, next_block + n_blocks))))
        next_block += n_blocks
    return StepBatch.build(seqs, page, "cuda")


@pytest.mark.parametrize("window", [None, 40])
def test_mixed_step_attention_matches_reference(window):
    """An eager step that decodes some sequences and prefills others (fresh, prefix-cached
    and chunked): one varlen launch for all of them."""
    from dist_infer.engine.attention_gpu import gpu_attention

    page, kv_heads, heads, head_dim = 16, 2, 8, 64
    # (tokens in cache after the step, new tokens this step)
    rows = [(30, 1), (5, 5), (70, 1), (48, 16), (129, 1), (40, 24)]
    cache, _ = _random_paged_batch([c for c, _ in rows], page, kv_heads, head_dim, torch.bfloat16, "cuda")
    gen = torch.Generator().manual_seed(3)
    batch = _ragged_step(rows, page)
    q = torch.randn(batch.num_tokens, heads, head_dim, generator=gen).to("cuda", torch.bfloat16)
    out = gpu_attention(q, cache, 0, batch, head_dim ** -0.5, window)
    ref = paged_attention_reference(q.float(), _as_float(cache), 0, batch, head_dim ** -0.5, window)
    assert _rel_err(out, ref) < 1e-2


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(32, 8, 128), (9, 3, 64), (16, 1, 128)])
@pytest.mark.parametrize("window", [None, 40])
def test_varlen_attention_matches_reference_with_graph_padding(heads, kv_heads, head_dim, window):
    """The mixed-step graphs' kernel: decodes, fresh, chunked and prefix-cached prefills
    in one launch, plus padding tokens and empty padding sequences (which get zeros)."""
    from dist_infer.engine.attention_gpu import paged_varlen_attention

    page = 16
    rows = [(30, 1), (5, 5), (70, 1), (48, 16), (129, 1), (40, 24), (300, 200), (3, 2)]
    cache, _ = _random_paged_batch([c for c, _ in rows], page, kv_heads, head_dim, torch.bfloat16, "cuda")
    batch = _ragged_step(rows, page)
    n, pad_tokens, pad_seqs = batch.num_tokens, 13, 5
    q = torch.randn(n + pad_tokens, heads, head_dim, generator=torch.Generator().manual_seed(4)).to("cuda",
                                                                                                  torch.bfloat16)
    starts = torch.cat([batch.query_starts_tensor, batch.query_starts_tensor.new_full((pad_seqs,), n)])
    ctx = torch.cat([batch.context_lens_tensor, batch.context_lens_tensor.new_ones(pad_seqs)])
    tables = torch.cat([batch.block_tables, batch.block_tables.new_zeros(pad_seqs, batch.block_tables.shape[1])])
    out = paged_varlen_attention(q, cache.k[0], cache.v[0], tables, starts, ctx, page, head_dim ** -0.5, window)
    ref = paged_attention_reference(q[:n].float(), _as_float(cache), 0, batch, head_dim ** -0.5, window)
    assert _rel_err(out[:n], ref) < 1e-2
    assert not out[n:].any()


def test_mixed_step_graphs_give_the_eager_tokens(tmp_path):
    """Under live-traffic-like scheduling (chunked prefill, prompts arriving while others
    decode, a shared prefix), steps replayed from the decode and mixed-step graphs give
    the tokens of the same engine run eagerly; and the mixed graphs were used."""
    from dist_infer.comm import LocalCommunicator, ParallelGroups
    from dist_infer.config import BuildConfig
    from dist_infer.engine.random_engine import build_random_engine
    from dist_infer.engine.runtime import EngineSpec, load_rank_engine
    from dist_infer.workers.llm_engine import EngineOptions, LLMEngine, Request
    from dist_infer.workers.worker import RankWorker

    build_random_engine("tiny-llama", tmp_path / "e", build=BuildConfig(dtype="float32", max_batch_size=8,
                        max_seq_len=256, kv_block_size=16), with_tokenizer=False, device="cpu")
    spec = EngineSpec.read(tmp_path / "e")
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    prompts = [list(range(3, 3 + n)) for n in (5, 40, 17, 100, 33, 1, 70, 64)]

    def run(cuda_graphs: bool) -> tuple[list[list[int]], list[str]]:
        engine = load_rank_engine(spec, groups, "cuda:0", cuda_graphs=cuda_graphs)
        kinds = []
        if cuda_graphs:
            for g in engine.graphs:
                replay = g.replay
                g.replay = lambda x, b, k, g=g, replay=replay: (kinds.append(g.kind), replay(x, b, k))[1]
        llm = LLMEngine(RankWorker(engine, groups), spec, options=EngineOptions(max_num_batched_tokens=48))
        pending, outs = list(enumerate(prompts)), {}
        while pending or llm.has_unfinished():
            if pending:  # one arrival per step
                i, p = pending.pop(0)
                llm.add_request(str(i), Request(p, 24, ignore_eos=True))
            for o in llm.step():
                outs.setdefault(o.request_id, []).extend(o.new_token_ids)
        engine.close()
        return [outs[str(i)] for i in range(len(prompts))], kinds

    eager, _ = run(False)
    graphed, kinds = run(True)
    assert graphed == eager
    assert kinds.count("mixed-step") >= 5 and kinds.count("decode") >= 5


def _as_float(cache):
    f = PagedKVCache(1, cache.num_blocks, cache.block_size, cache.k.shape[2], cache.k.shape[3], torch.float32, "cuda")
    f.k.copy_(cache.k)
    f.v.copy_(cache.v)
    return f


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("with_residual", [False, True])
def test_fused_add_rmsnorm(with_residual):
    from dist_infer.engine.fused_gpu import add_rmsnorm
    from dist_infer.engine.layers import RMSNorm

    x = torch.randn(37, 4096, dtype=torch.bfloat16, device="cuda")
    res = torch.randn_like(x) if with_residual else None
    norm = RMSNorm(4096, 1e-5, torch.bfloat16)
    norm.weight.data = torch.randn(4096, dtype=torch.bfloat16)
    ref, ref_res = norm.cpu().forward(x.cpu(), None if res is None else res.cpu())
    out, out_res = add_rmsnorm(x, norm.weight.cuda(), 1e-5, res)
    assert torch.equal(out_res.cpu(), ref_res)
    assert _rel_err(out.cpu(), ref) < 1e-2


@pytest.mark.parametrize("n, heads, kv, hd", [(23, 8, 2, 128), (5, 9, 3, 64), (7, 32, 8, 128), (3, 40, 8, 128),
                                             (1, 4, 1, 32), (17, 32, 8, 128), (40, 9, 3, 64)])
def test_fused_rope_write_kv(n, heads, kv, hd):
    """Every head of every token turned and written, however the heads split over programs."""
    from dist_infer.engine.fused_gpu import rope_write_kv
    from dist_infer.engine.layers import Rotary

    rope = Rotary((1.0 / (500000 ** (torch.arange(0, hd, 2).float() / hd))).tolist(), 1.3)
    positions = torch.randint(0, 4000, (n,))
    q, k, v = (torch.randn(n, h, hd) for h in (heads, kv, kv))
    cos, sin = rope.cos_sin(positions, torch.float32)
    slots = torch.randperm(64)[:n]
    k_cache, v_cache = torch.zeros(64, kv, hd, device="cuda"), torch.zeros(64, kv, hd, device="cuda")
    q_gpu = q.cuda()
    rope_write_kv(q_gpu, k.cuda(), v.cuda(), positions.cuda(), rope.inv_freq.cuda(), rope.scaling,
                  k_cache, v_cache, slots.cuda())
    assert _rel_err(q_gpu.cpu(), Rotary.apply(q, cos, sin)) < 1e-5
    assert _rel_err(k_cache[slots.cuda()].cpu(), Rotary.apply(k, cos, sin)) < 1e-5
    assert torch.equal(v_cache[slots.cuda()].cpu(), v)


def test_fused_silu_mul():
    from dist_infer.engine.fused_gpu import silu_mul

    gate_up = torch.randn(5, 2 * 3000, dtype=torch.bfloat16, device="cuda")
    gate, up = gate_up.float().chunk(2, dim=-1)
    assert _rel_err(silu_mul(gate_up), torch.nn.functional.silu(gate) * up) < 1e-2


# A fresh process loads the engine (no kernel compiled in memory yet) and generates; Triton's
# compile listener fires in this process only, not in the compile workers.
LOAD_AND_GENERATE = """
import json, logging, sys
from triton import knobs
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.workers.llm_engine import LLMEngine, Request
from dist_infer.workers.worker import RankWorker
logging.basicConfig(level=logging.INFO)
hits, built = [], []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
import triton.runtime.build as build  # Triton 3.6 builds a C launcher per kernel signature here
build_module = build._build
build._build = lambda name, *args, **kwargs: (built.append(name), build_module(name, *args, **kwargs))[1]
spec = EngineSpec.read(sys.argv[1])
groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
engine = load_rank_engine(spec, groups, "cuda:0")
at_load, launchers_at_load = list(hits), built.count("__triton_launcher")
llm = LLMEngine(RankWorker(engine, groups), spec)
for i, n in enumerate((5, 40, 130, 1)):
    llm.add_request(str(i), Request(list(range(3, 3 + n)), 12, ignore_eos=True))
outs = {}
while llm.has_unfinished():
    for o in llm.step():
        outs.setdefault(o.request_id, []).extend(o.new_token_ids)
print(json.dumps({"compiled": at_load.count(False), "from_cache": at_load.count(True), "launchers": launchers_at_load,
                  "tokens": [outs[str(i)] for i in range(4)]}))
"""


def test_kernels_compiled_in_worker_processes(tmp_path):
    """A first load hands its Triton compiles to worker processes: the rank itself then compiles
    nothing (the capture finds every kernel in the cache), and the tokens are those of a load that
    compiles inside the rank (DIST_INFER_COMPILE_WORKERS=0). Each of those starts from an empty
    cache; a second load from the workers' cache starts no worker."""
    import json
    import subprocess
    import sys

    from dist_infer.config import BuildConfig
    from dist_infer.engine.random_engine import build_random_engine

    engine = tmp_path / "e"
    build_random_engine("tiny-llama", engine, build=BuildConfig(dtype="bfloat16", max_batch_size=8, max_seq_len=256,
                        kv_block_size=16), with_tokenizer=False, device="cpu")

    def load(workers: str, cache: str) -> tuple[dict, str]:
        env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / cache), "DIST_INFER_COMPILE_WORKERS": workers}
        proc = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, str(engine)], env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr

    (in_rank, _), (in_workers, log), (again, log_again) = load("0", "a"), load("4", "b"), load("4", "b")
    assert in_rank["compiled"] >= 5
    assert in_workers["compiled"] == 0 and in_workers["from_cache"] >= in_rank["compiled"]
    assert f"{in_rank['compiled']} Triton kernels compiled by 4 worker processes" in log
    assert in_workers["tokens"] == in_rank["tokens"] == again["tokens"]
    assert again["compiled"] == 0 and "worker processes" not in log_again
    assert in_workers["launchers"] == again["launchers"] == 0  # the workers built them (where Triton builds any)
    import triton

    if triton.__version__.startswith("3.6"):  # the GPU image's Triton builds a C launcher per kernel signature
        assert in_rank["launchers"] > 0


@pytest.fixture(scope="module")
def tiny_gpu_engines(tmp_path_factory):
    """A tiny llama partitioned for (1,1), (2,1), (1,2), built in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("gpu")
    model = make_tiny_model(root / "hf", "llama", seed=3)
    engines = {}
    for tp, pp in ((1, 1), (2, 1), (1, 2)):
        ckpt = root / f"ckpt-{tp}-{pp}"
        assert run_cli("partition", "--model", str(root / "hf"), "--tp", str(tp), "--pp", str(pp),
                       "--out", str(ckpt), "--quiet").returncode == 0
        for dtype in ("float32", "bfloat16"):
            out = root / f"engine-{tp}-{pp}-{dtype}"
            proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), "--dtype", dtype,
                           "--max-batch-size", "4")
            assert proc.returncode == 0, proc.stderr
            engines[tp, pp, dtype] = out
    prompts = [[5, 17, 33, 2, 99, 100, 7], [8, 9, 10], list(range(40, 75))]
    return model, engines, write_prompts(root / "p.jsonl", prompts), prompts


def _gpu_run(engine, prompts_file, world, new_tokens=32):
    return run_cli("run", "--engine", str(engine), "--prompts-file", str(prompts_file), "--json", "--ignore-eos",
                   "--max-new-tokens", str(new_tokens), "--device", "cuda", world=world, mpi=world > 1,
                   env=NCCL_ENV, timeout=300)


def test_gpu_float32_matches_transformers(tiny_gpu_engines):
    """Paged KV + Triton decode + CUDA graphs on one GPU give transformers' greedy tokens."""
    model, engines, prompts_file, prompts = tiny_gpu_engines
    engine = engines[1, 1, "float32"]
    got = [c["output_ids"] for c in completions(_gpu_run(engine, prompts_file, 1))]
    assert got == [hf_greedy(model, p, 32) for p in prompts]
    # The rank's compiled kernels are kept in the engine, so a reload compiles nothing.
    assert any((engine / "rank0" / "triton-cache").rglob("*.cubin"))


def test_split_decode_path_matches_transformers(tmp_path):
    """Llama with 32-wide heads (tiny-llama's 16 are below the fused kernel's minimum): its
    decode steps of 1-3 sequences take the split-context kernel with RoPE and the KV write
    inside (kernels.rope_attention), graph-captured, and give transformers' greedy tokens."""
    from dist_infer.engine.attention_gpu import decode_splits, rope_fusable

    model = make_tiny_model(tmp_path / "hf", "llama", seed=5, hidden_size=256, intermediate_size=512)
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    assert rope_fusable(head_dim) and decode_splits(3, model.config.num_key_value_heads, torch.device("cuda")) > 1
    assert run_cli("partition", "--model", str(tmp_path / "hf"), "--out", str(tmp_path / "ckpt"),
                   "--quiet").returncode == 0
    proc = run_cli("build", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "e"),
                   "--dtype", "float32", "--max-batch-size", "4")
    assert proc.returncode == 0, proc.stderr
    prompts = [[5, 17, 33, 2, 99, 100, 7], list(range(40, 75)), [8]]
    for batch in (prompts, prompts[:1]):  # 3 sequences a step, then 1
        got = [c["output_ids"] for c in completions(_gpu_run(tmp_path / "e", write_prompts(tmp_path / "p.jsonl", batch),
                                                             1, new_tokens=48))]
        assert got == [hf_greedy(model, p, 48) for p in batch]


# bf16 greedy decoding can only legitimately differ between layouts where the
# reference's top-2 logits are closer than bf16 noise: TP sums partial products
# in another order. Logit tolerance: 0.1 absolute (this model's logits have a
# spread of ~1.2; bf16 rounding moves them by ~0.01-0.03).
LOGIT_TOLERANCE = 0.1


def _assert_same_tokens_up_to_near_ties(model, prompts, reference, other):
    for prompt, ref, got in zip(prompts, reference, other):
        k = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
        if k is None:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + ref[:k]])).logits[0, -1]
        margin = (logits[ref[k]] - logits[got[k]]).abs().item()
        assert margin < LOGIT_TOLERANCE, (f"tokens differ at step {k} where the float32 reference's margin is "
                                          f"{margin:.3f} (> {LOGIT_TOLERANCE}): not a bf16 near-tie")


@needs_2_gpus
@pytest.mark.parametrize("layout", [(2, 1), (1, 2)])
def test_two_gpus_match_one_gpu_bf16(tiny_gpu_engines, layout):
    """TP=2 and PP=2 over NCCL (all-reduce captured in the decode graphs) give the
    same bf16 greedy tokens as TP=1 for the first 32 tokens of every prompt,
    except at near-ties of the float32 reference (LOGIT_TOLERANCE)."""
    model, engines, prompts_file, prompts = tiny_gpu_engines
    one = [c["output_ids"] for c in completions(_gpu_run(engines[1, 1, "bfloat16"], prompts_file, 1))]
    started = time.perf_counter()
    proc = _gpu_run(engines[(*layout, "bfloat16")], prompts_file, 2)
    two = [c["output_ids"] for c in completions(proc)]
    assert [len(t) for t in two] == [32] * len(prompts)
    _assert_same_tokens_up_to_near_ties(model, prompts, one, two)
    # The job exits by itself after graphs and communicators are torn down.
    assert time.perf_counter() - started < 240


@needs_2_gpus
def test_killed_rank_ends_two_gpu_job(tmp_path):
    """A TP=2 rank killed while its peer waits inside a graph-captured NCCL
    all-reduce: the whole job still ends within 10 s, non-zero."""
    from conftest import kill_rank_mid_run

    make_tiny_model(tmp_path / "hf", "llama", max_position_embeddings=16384)
    assert run_cli("partition", "--model", str(tmp_path / "hf"), "--tp", "2", "--out", str(tmp_path / "ckpt"),
                   "--quiet").returncode == 0
    assert run_cli("build", "--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "engine"), "--dtype",
                   "bfloat16", "--max-seq-len", "16384", "--max-batch-size", "2").returncode == 0
    prompts = write_prompts(tmp_path / "p.jsonl", [[5, 6, 7], [8, 9]])
    args = ["run", "--engine", str(tmp_path / "engine"), "--prompts-file", str(prompts), "--device", "cuda",
            "--max-new-tokens", "16000", "--ignore-eos", "--json"]  # ~16k decode steps: seconds of work
    code, took, survivors = kill_rank_mid_run(args, 2, 1, 10, env=NCCL_ENV)
    assert code != 0 and not survivors
    print(f"killed rank 1 of a TP=2 GPU job: exited {code} after {took:.2f}s")
