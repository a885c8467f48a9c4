"""The KV pool's size: --kv-cache-free-gpu-memory-fraction and --kv-cache-bytes drive
the sizing function as TensorRT-LLM's knobs do, an FP8 pool holds twice the blocks of a
bf16 one in the same memory, and bad flag values are refused at parse time (exit 2)."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import completions, run_cli, write_prompts
from dist_infer.cli import _kv_cache_config, build_parser
from dist_infer.comm import LocalCommunicator, ParallelGroups
from dist_infer.config import BuildConfig, KVCacheConfig
from dist_infer.engine.kv_cache import PagedKVCache
from dist_infer.engine.random_engine import build_random_engine
from dist_infer.engine.runtime import EngineSpec, kv_pool_blocks, load_rank_engine
from dist_infer.errors import EngineError, LaunchError

GiB, MiB = 2**30, 2**20
MANY = 10**9  # an engine that could use any number of blocks: the budget decides


# ---------------------------------------------------------------- the sizing function

@pytest.mark.parametrize("fraction,blocks", [(None, 7372), (1.0, 8192), (0.5, 4096), (0.25, 2048)])
def test_memory_fraction_takes_that_share_of_the_memory_left_for_the_pool(fraction, blocks):
    """10 GiB free after the weights, 2 GiB set aside for the step: the pool gets F x 8 GiB
    (default F = 0.9, TensorRT-LLM's) in 1 MiB blocks."""
    config = KVCacheConfig(free_gpu_memory_fraction=fraction)
    assert kv_pool_blocks(MANY, MiB, config, free_bytes=10 * GiB, reserved_bytes=2 * GiB) == blocks


def test_byte_budget_and_fraction_the_smaller_wins():
    free = dict(free_bytes=10 * GiB, reserved_bytes=2 * GiB)
    assert kv_pool_blocks(MANY, MiB, KVCacheConfig(free_gpu_memory_fraction=0.5, max_bytes=GiB), **free) == 1024
    assert kv_pool_blocks(MANY, MiB, KVCacheConfig(free_gpu_memory_fraction=0.5, max_bytes=6 * GiB), **free) == 4096
    assert kv_pool_blocks(MANY, MiB, KVCacheConfig(max_bytes=GiB), **free) == 1024


def test_the_engine_limit_caps_any_budget_and_nothing_left_gives_zero():
    assert kv_pool_blocks(300, MiB, KVCacheConfig(free_gpu_memory_fraction=1.0), 10 * GiB, 2 * GiB) == 300
    assert kv_pool_blocks(MANY, MiB, KVCacheConfig(), free_bytes=GiB, reserved_bytes=2 * GiB) == 0


def test_on_cpu_only_the_byte_budget_counts():
    """No free-GPU-memory number on a CPU rank: the fraction is ignored (load warns)."""
    assert kv_pool_blocks(300, MiB, KVCacheConfig(free_gpu_memory_fraction=0.1)) == 300
    assert kv_pool_blocks(300, MiB, KVCacheConfig(max_bytes=100 * MiB + 5)) == 100


def test_fp8_blocks_are_half_the_bytes_so_the_pool_holds_twice_the_blocks():
    shape = dict(num_layers=32, block_size=16, kv_heads=8, head_dim=128)
    bf16 = PagedKVCache.block_bytes(**shape, storage_dtype=torch.bfloat16)
    fp8 = PagedKVCache.block_bytes(**shape, storage_dtype=torch.float8_e4m3fn)
    assert bf16 == 2 * fp8 == 2 * 32 * 16 * 8 * 128 * 2
    for config in (KVCacheConfig(free_gpu_memory_fraction=0.9), KVCacheConfig(max_bytes=3 * GiB)):
        blocks = [kv_pool_blocks(MANY, b, config, free_bytes=70 * GiB, reserved_bytes=4 * GiB) for b in (bf16, fp8)]
        assert blocks[1] in (2 * blocks[0], 2 * blocks[0] + 1)  # floor division may leave one more


# ---------------------------------------------------------------- a loaded engine (CPU)

@pytest.fixture(scope="module")
def bf16_engine(tmp_path_factory):
    """tiny-llama in bf16: 4 layers x 2 KV heads x 16 dims, blocks of 4 tokens; it would
    take 4 x 16 + 1 = 65 blocks (max_batch_size x max_seq_len)."""
    out = tmp_path_factory.mktemp("kv-sizing") / "engine"
    build_random_engine("tiny-llama", out, build=BuildConfig(dtype="bfloat16", max_batch_size=4, max_seq_len=64,
                                                             kv_block_size=4), with_tokenizer=False, device="cpu")
    return EngineSpec.read(out)


def _pool_blocks(spec: EngineSpec, config: KVCacheConfig) -> int:
    groups = ParallelGroups.build(LocalCommunicator(), spec.mapping)
    return load_rank_engine(spec, groups, "cpu", verify=False, cuda_graphs=False, kv_cache=config).cache.num_blocks


BF16_BLOCK = 2 * 4 * 4 * 2 * 16 * 2  # K and V, layers, tokens, KV heads, head dim, bytes


def test_a_pipeline_wants_a_batch_of_full_sequences_per_stage(bf16_engine):
    """At PP=2 two micro-batches of max_batch_size run at once: the engine wants room for both."""
    from dataclasses import replace

    from dist_infer.config import Mapping

    assert bf16_engine.num_kv_blocks == 4 * 16 + 1
    assert replace(bf16_engine, mapping=Mapping(1, 2)).num_kv_blocks == 2 * 4 * 16 + 1


def test_loaded_fp8_pool_has_twice_the_blocks_of_bf16_in_the_same_bytes(bf16_engine):
    assert _pool_blocks(bf16_engine, KVCacheConfig()) == 65  # no budget on CPU: what the engine can use
    budget = 20 * BF16_BLOCK
    assert _pool_blocks(bf16_engine, KVCacheConfig(max_bytes=budget)) == 20
    assert _pool_blocks(bf16_engine, KVCacheConfig(dtype="fp8", max_bytes=budget)) == 40


def test_cpu_warns_that_the_fraction_is_ignored(bf16_engine, caplog):
    with caplog.at_level(logging.WARNING):
        assert _pool_blocks(bf16_engine, KVCacheConfig(free_gpu_memory_fraction=0.01)) == 65
    assert "ignored on CPU" in caplog.text


def test_a_budget_below_one_sequence_is_refused_with_the_fixes(bf16_engine):
    with pytest.raises(EngineError, match="--kv-cache-bytes.*--kv-cache-dtype fp8"):
        _pool_blocks(bf16_engine, KVCacheConfig(max_bytes=10 * BF16_BLOCK))  # 16 blocks + scratch needed
    assert _pool_blocks(bf16_engine, KVCacheConfig(dtype="fp8", max_bytes=10 * BF16_BLOCK)) == 20  # fits in FP8


def test_run_takes_the_flags(bf16_engine, tmp_path):
    """The flags reach every rank's engine: a byte budget that holds one sequence only in
    FP8 answers, and the CPU rank says the fraction does not apply to it."""
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    proc = run_cli("run", "--engine", str(bf16_engine.directory), "--prompts-file", str(prompts), "--json",
                   "--max-new-tokens", "4", "--kv-cache-dtype", "fp8", "--kv-cache-bytes", str(10 * BF16_BLOCK),
                   "--kv-cache-free-gpu-memory-fraction", "0.5", "--no-verify", timeout=120)
    assert len(completions(proc)[0]["output_ids"]) == 4
    assert "ignored on CPU" in proc.stderr and "KV pool holds 20 blocks" in proc.stderr


# ---------------------------------------------------------------- flags and config

def _parse(*flags: str):
    return build_parser().parse_args(["run", "--engine", "e", "--prompt", "p", *flags])


@pytest.mark.parametrize("flags,message", [
    (("--kv-cache-free-gpu-memory-fraction", "0"), "must be in (0, 1]"),
    (("--kv-cache-free-gpu-memory-fraction", "1.5"), "must be in (0, 1]"),
    (("--kv-cache-free-gpu-memory-fraction", "nan"), "must be in (0, 1]"),
    (("--kv-cache-free-gpu-memory-fraction", "most"), "expected a number"),
    (("--kv-cache-bytes", "0"), "at least 1 byte"),
    (("--kv-cache-bytes", "4 gigs"), "KiB, MiB, GiB"),
    (("--kv-cache-bytes=-1GiB",), "KiB, MiB, GiB"),
    (("--kv-cache-dtype", "fp16"), "invalid choice: 'fp16'"),
])
@pytest.mark.parametrize("command", ["run", "serve", "bench"])
def test_bad_values_exit_2_at_parse_time(command, flags, message, capsys):
    argv = {"run": ["run", "--engine", "e"], "serve": ["serve", "--engine", "e"], "bench": ["bench"]}[command]
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([*argv, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert flags[0].split("=")[0] in err and message in err


def test_good_values_give_the_config_and_round_trip():
    args = _parse("--kv-cache-dtype", "fp8", "--kv-cache-free-gpu-memory-fraction", "0.4", "--kv-cache-bytes", "2GiB")
    config = _kv_cache_config(args)
    assert config == KVCacheConfig("fp8", 0.4, 2 * GiB)
    assert _kv_cache_config(_parse(*config.cli_args())) == config  # how dist_infer.LLM passes it to its ranks
    assert _kv_cache_config(_parse()) == KVCacheConfig() and KVCacheConfig().cli_args() == []
    assert _parse("--kv-cache-bytes", "1.5GB").kv_cache_bytes == 1_500_000_000


@pytest.mark.parametrize("fields", [dict(dtype="int8"), dict(free_gpu_memory_fraction=0.0),
                                    dict(free_gpu_memory_fraction=2), dict(max_bytes=0), dict(max_bytes=1.5)])
def test_config_validates_on_construction(fields):
    with pytest.raises(LaunchError):
        KVCacheConfig(**fields)
