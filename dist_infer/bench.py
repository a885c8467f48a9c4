"""`dist-infer bench`: throughput and latency of random-weight models at real
shapes, one `[BENCHMARK]` line per case, with the transformers baseline run
beside it (same GPU, same process) and the ratio printed.

Launch with one process per rank: `mpirun -n TP*PP dist-infer bench --tp TP --pp PP ...`.
MBU = bytes read per decode step (this rank's weights + the KV it attends
over) / step time / device copy bandwidth measured in the same run.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dist_infer.comm import ParallelGroups, world_from_launch
from dist_infer.comm.base import collective_call
from dist_infer.comm.bootstrap import resolve_device
from dist_infer.config import BuildConfig, KVCacheConfig, Mapping, ModelConfig, check_layout
from dist_infer.engine.build import DTYPES
from dist_infer.engine.model import StageModel
from dist_infer.engine.runtime import EngineSpec, load_rank_engine
from dist_infer.engine.sampling import SamplingParams
from dist_infer.errors import LaunchError
from dist_infer.presets import preset_hf_config
from dist_infer.workers.llm_engine import EngineOptions, LLMEngine, Request, resolve_pipeline_depth
from dist_infer.workers.run import prepare_gc_for_steps
from dist_infer.workers.worker import RankWorker

log = logging.getLogger(__name__)

def preset_config(name: str):
    return preset_hf_config(name)


def random_rank_weights(model: StageModel, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """Random weights with the model's names and shapes, made on the device (no host copy)."""
    gen = torch.Generator(device).manual_seed(seed)
    params = dict(model.named_parameters())
    weights = {}
    for name, p in params.items():
        if name == "lm_head.weight" and model.ties_lm_head:
            continue
        if name.endswith((".scales", ".offsets")):  # a quantized layer's: sized for its codes (below)
            codes = params[name.rsplit(".", 1)[0] + ".qweight"].dtype
            weights[name] = _code_scale(name, p, codes, device)
        else:
            weights[name] = _random_tensor(name, p, device, gen)
    return weights


# Standard deviation of the random codes _random_tensor draws per storage dtype: float8 N(0, 1);
# int8 uniform over [-128, 127]; uint8 (INT4, two codes a byte) uniform over 0..15 per nibble.
CODE_STD = {torch.float8_e4m3fn: 1.0, torch.int8: 256 / 12 ** 0.5, torch.uint8: 16 / 12 ** 0.5}


def _code_scale(name: str, p: torch.Tensor, codes: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scales (and INT4 offsets, centring codes 0..15) that make a quantized layer's weights
    ~(0, 0.02) like a dense one's, whatever the mode."""
    scale = 0.02 / CODE_STD[codes]
    return torch.full(p.shape, scale if name.endswith(".scales") else -7.5 * scale, dtype=p.dtype, device=device)


def _random_tensor(name: str, p: torch.Tensor, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Norms 1, weights ~N(0, 0.02); a quantized layer's codes random over its storage dtype."""
    if name.endswith("norm.weight"):
        return torch.ones(p.shape, dtype=p.dtype, device=device)
    if p.dtype.is_floating_point and p.element_size() >= 2:
        return torch.empty(p.shape, dtype=p.dtype, device=device).normal_(0.0, 0.02, generator=gen)
    if p.dtype.is_floating_point:  # float8 codes
        return torch.empty(p.shape, dtype=torch.bfloat16, device=device).normal_(0.0, 1.0, generator=gen).to(p.dtype)
    info = torch.iinfo(p.dtype)  # int8 / packed int4 codes
    return torch.randint(info.min, info.max + 1, p.shape, dtype=p.dtype, device=device, generator=gen)


def expert_read_fraction(cfg: ModelConfig, batch: int) -> float:
    """The share of a MoE layer's expert weights a decode step of `batch` tokens needs, expected
    under uniform routing: 1 - (1 - k/E)^batch (Mixtral's top-2 of 8: 0.25 at batch 1, 0.90 at 8);
    1 for a dense model. MBU counts these bytes, whether a path reads only them or all experts."""
    if not cfg.num_experts:
        return 1.0
    return 1.0 - (1.0 - cfg.experts_per_token / cfg.num_experts) ** batch


def weight_bytes_read(model: StageModel, cfg: ModelConfig, batch: int) -> float:
    """Bytes of this rank's weights a decode step of `batch` tokens needs (every weight but the
    unchosen experts')."""
    total = experts = 0
    for name, p in model.named_parameters():
        total += p.numel() * p.element_size()
        experts += p.numel() * p.element_size() if ".experts." in name else 0
    return total - experts * (1.0 - expert_read_fraction(cfg, batch))


def _moe_path(kernels, cfg: ModelConfig, batch: int) -> str:
    """Which MoE path a decode step of `batch` runs: engine/moe_gpu.py's grouped kernels (decode
    sizes) or every expert on every token (larger steps, or DIST_INFER_MOE_KERNEL=0: the baseline)."""
    from dist_infer.engine.moe_gpu import use_grouped_kernel

    grouped = getattr(kernels, "moe_kernel", False) and use_grouped_kernel(batch, cfg.experts_per_token,
                                                                            cfg.num_experts)
    return "grouped" if grouped else "dense"


def copy_bandwidth(device: torch.device, gigabytes: float = 2.0) -> float:
    """Device-to-device copy, bytes read + written per second (the MBU ceiling)."""
    n = int(gigabytes * 1e9 / 2)
    src = torch.empty(n, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    reps = 10
    for _ in range(reps):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize(device)
    seconds = start.elapsed_time(end) / 1e3 / reps
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n * 2 / seconds


@dataclass
class CaseResult:
    batch: int
    latency_s: float
    ttft_s: float
    step_ms: list[float]
    tokens: int
    mbu: float
    gpu_step_ms: float  # rank 0's device time of a decode step (the rest of a step is host work)


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


def bench_line(**fields) -> str:
    return "[BENCHMARK] " + " ".join(f"{k} {v}" for k, v in fields.items())


class BenchReport:
    """Every case's `[BENCHMARK]` line on stdout and, with --output-json, the same fields as JSON
    for dashboards (numbers as numbers), written once at the end, atomically."""

    def __init__(self, path: Path | None = None):
        self.path, self.rows = path, []

    def emit(self, fields: dict) -> None:
        print(bench_line(**fields), flush=True)
        self.rows.append({k: _as_number(v) for k, v in fields.items()})

    def save(self) -> None:
        if self.path is None:
            return
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps({"results": self.rows}, indent=1) + "\n")
        tmp.replace(self.path)
        log.info("wrote %d results to %s", len(self.rows), self.path)


def _as_number(value):
    for kind in (int, float):
        try:
            return kind(value)
        except (TypeError, ValueError):
            pass
    return value


def check_output_json(path: Path | None) -> None:
    """Refuse an --output-json that cannot be written, before any rank loads anything."""
    if path is None:
        return
    if path.is_dir():
        raise LaunchError(f"--output-json {path} is a directory; name a file, e.g. {path / 'bench.json'}.")
    if not path.parent.is_dir():
        raise LaunchError(f"--output-json {path}: the directory {path.parent} does not exist; create it first.")


@dataclass(frozen=True)
class MaxLoad:
    """trtllm-bench's throughput mode: every request submitted at once, the running batch as large
    as `max_batch` and the KV pool allow, steps of at most `max_num_batched_tokens` tokens."""
    num_requests: int
    max_batch: int | None = None  # None: the engine's max batch size
    max_num_batched_tokens: int = 8192


@dataclass
class MaxLoadResult:
    num_requests: int
    max_batch: int
    wall_s: float          # from submitting every request to the last token
    output_tokens: int
    ttft_s: list[float]    # per request, from the common submission
    steps: int


def max_load_requests(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0) -> list[Request]:
    """Random prompts (no shared prefixes), every answer exactly `output_len` tokens."""
    gen = torch.Generator().manual_seed(seed)
    return [Request(torch.randint(0, vocab_size, (input_len,), generator=gen).tolist(), output_len, SamplingParams(),
                    ignore_eos=True) for _ in range(num)]


def run_max_load(llm: LLMEngine, requests: list[Request]) -> MaxLoadResult:
    """One short warm-up pass (compiles the eager prefill shapes), then every request at once."""
    max_batch = llm.scheduler.config.max_num_seqs
    llm.generate([dataclasses.replace(r, max_new_tokens=4) for r in requests[:max_batch]])
    t0 = time.perf_counter()
    completions = llm.generate(requests)
    wall = time.perf_counter() - t0
    return MaxLoadResult(len(requests), max_batch, wall, sum(len(c.output_ids) for c in completions),
                         [c.first_token_s for c in completions], len(llm.step_times))


def max_load_fields(r: MaxLoadResult) -> dict[str, str]:
    """The [BENCHMARK] columns of a max-load case: output tokens/s end to end, requests/s, TTFT."""
    return {"num_requests": str(r.num_requests), "max_batch_size": str(r.max_batch), "steps": str(r.steps),
            "tokens_per_sec": f"{r.output_tokens / r.wall_s:.2f}", "requests_per_sec": f"{r.num_requests / r.wall_s:.3f}",
            "total_generated_tokens": str(r.output_tokens), "wall_time(s)": f"{r.wall_s:.3f}",
            "ttft_p50(ms)": f"{_percentile(r.ttft_s, 50) * 1e3:.1f}",
            "ttft_p99(ms)": f"{_percentile(r.ttft_s, 99) * 1e3:.1f}"}


def check_max_load(max_load: MaxLoad | None, engine_max_batch: int) -> None:
    if max_load and max_load.max_batch and max_load.max_batch > engine_max_batch:
        raise LaunchError(f"--max-batch-size {max_load.max_batch} is above the engine's max batch size "
                          f"({engine_max_batch}); rebuild it with `dist-infer build --max-batch-size "
                          f"{max_load.max_batch}`, or ask for at most {engine_max_batch}.")


def run_bench(preset: str, tp: int, pp: int, batch_sizes: list[int], input_len: int, output_len: int,
              dtype: str = "bfloat16", baseline: str | None = None, cuda_graphs: bool = True,
              warmup: int = 1, engine_dir: Path | None = None, kv_cache: KVCacheConfig | None = None,
              max_load: MaxLoad | None = None, report: BenchReport | None = None,
              async_scheduling: bool = True, pipeline_depth: int | None = None) -> int:
    report = report or BenchReport()
    world = world_from_launch()
    device = torch.device(collective_call(world, lambda: resolve_device("cuda", world.rank)))
    torch.cuda.set_device(device)
    started = time.perf_counter()
    if engine_dir is not None:  # a built engine (e.g. the one `serve` is measured on)
        spec = collective_call(world, lambda: EngineSpec.read(engine_dir))
        collective_call(world, lambda: spec.check_world(world.size))
        collective_call(world, lambda: check_max_load(max_load, spec.build.max_batch_size))
        collective_call(world, lambda: resolve_pipeline_depth(pipeline_depth, spec.mapping.pp))
        hf_config = engine_hf_config(engine_dir, spec.model.vocab_size) if baseline == "hf" else None
        model_cfg, dtype, preset = spec.model, spec.build.dtype, str(engine_dir)
        tp, pp = spec.mapping.tp, spec.mapping.pp
        groups = ParallelGroups.build(world, spec.mapping, str(device))
        engine = load_rank_engine(spec, groups, str(device), verify=False, cuda_graphs=cuda_graphs, kv_cache=kv_cache)
    else:
        mapping = Mapping(tp, pp)
        if world.size != mapping.world_size:
            raise LaunchError(f"--tp {tp} --pp {pp} needs {mapping.world_size} processes; launch with "
                              f"`mpirun -n {mapping.world_size} dist-infer bench ...` (got {world.size}).")
        hf_config = preset_config(preset)
        model_cfg = ModelConfig.from_hf(hf_config)
        check_layout(model_cfg, tp, pp)
        resolve_pipeline_depth(pipeline_depth, pp)
        max_batch = (max_load.max_batch or 512) if max_load else max(batch_sizes)
        build = BuildConfig(dtype=dtype, max_batch_size=max_batch,
                            max_seq_len=input_len + output_len + 16, kv_block_size=16)
        spec = EngineSpec(directory=None, model=model_cfg, mapping=mapping, build=build,
                          vocab_size_padded=-(-model_cfg.vocab_size // tp) * tp, files={})
        groups = ParallelGroups.build(world, mapping, str(device))
        with torch.device("meta"):
            shapes = StageModel(model_cfg, groups.mapping, groups.tp, spec.vocab_size_padded, DTYPES[dtype])
        weights = random_rank_weights(shapes, device, seed=groups.mapping.rank)
        engine = load_rank_engine(spec, groups, str(device), verify=False, cuda_graphs=cuda_graphs, weights=weights,
                                  kv_cache=kv_cache)
        del weights
    torch.cuda.synchronize(device)
    build_time = collective_call(world, lambda: time.perf_counter() - started, gather=True)
    worker = RankWorker(engine, groups)
    prepare_gc_for_steps()
    if world.rank != 0:
        worker.serve()
        worker.close()
        return 0

    bandwidth = copy_bandwidth(device)
    log.info("device copy bandwidth %.0f GB/s; build (random weights + graph capture) %.1f s",
             bandwidth / 1e9, max(build_time))
    engine_kv_dtype, kv_blocks = str(engine.cache.storage_dtype).removeprefix("torch."), engine.cache.num_blocks
    kv_bytes_per_token = 2 * len(engine.model.layer_ids) * engine.cache.k.shape[2] * model_cfg.head_dim * \
        engine.cache.k.element_size()
    if max_load:
        row = dict(model_name=preset, world_size=world.size, tp=tp, pp=pp, precision=dtype,
                   quant=spec.build.quant or "none", kv_cache_dtype=engine_kv_dtype, kv_cache_blocks=kv_blocks,
                   input_length=input_len, output_length=output_len, async_scheduling=async_scheduling,
                   pipeline_depth=pipeline_depth or pp)
        return _bench_max_load(worker, spec, max_load, row, model_cfg.vocab_size, device, report, async_scheduling,
                               pipeline_depth)
    # As before the step-wise engine: every prompt prefilled in one step, no prefix reuse between repeats.
    options = EngineOptions(max_num_batched_tokens=max(batch_sizes) * input_len, enable_prefix_caching=False,
                            async_scheduling=async_scheduling, pipeline_depth=pipeline_depth)
    llm = LLMEngine(worker, spec, options=options)
    gen = torch.Generator().manual_seed(0)
    results = []
    for batch in batch_sizes:
        prompts = [torch.randint(0, model_cfg.vocab_size, (input_len,), generator=gen).tolist() for _ in range(batch)]
        requests = [Request(p, output_len, SamplingParams(), ignore_eos=True) for p in prompts]
        for _ in range(warmup):
            llm.generate(requests)
        torch.cuda.reset_peak_memory_stats(device)
        engine.step_events = []
        t0 = time.perf_counter()
        completions = llm.generate(requests)
        latency = time.perf_counter() - t0
        gpu_ms = engine.decode_gpu_ms()
        engine.step_events = None
        decode = [s for n, s in llm.step_times if n == batch]  # pure decode steps
        mean_ctx = input_len + output_len / 2
        step_bytes = weight_bytes_read(engine.model, model_cfg, batch) + batch * mean_ctx * kv_bytes_per_token
        mbu = step_bytes / statistics.median(decode) / bandwidth if decode else 0.0
        results.append(CaseResult(batch, latency, max(c.first_token_s for c in completions),
                                  [s * 1e3 for s in decode], sum(len(c.output_ids) for c in completions), mbu,
                                  statistics.median(gpu_ms) if gpu_ms else 0.0))
    llm.shutdown()
    engine_kernels = engine.model.kernels
    peak_gb = torch.cuda.max_memory_allocated(device) / 1e9
    worker.close()

    hf_results = {}
    if baseline == "hf" and hf_config is not None:
        del engine, worker, llm
        torch.cuda.empty_cache()
        hf_results = hf_baseline(hf_config, batch_sizes, input_len, output_len, dtype, device)
    cap = "%d.%d" % torch.cuda.get_device_capability(device)
    for r in results:
        gen_time = max(r.latency_s - r.ttft_s, 1e-9)
        fields = dict(model_name=preset, world_size=world.size, tp=tp, pp=pp, num_heads=model_cfg.num_heads,
                      num_kv_heads=model_cfg.num_kv_heads, num_layers=model_cfg.num_layers,
                      hidden_size=model_cfg.hidden_size, vocab_size=model_cfg.vocab_size, precision=dtype,
                      kv_cache_dtype=engine_kv_dtype, kv_cache_blocks=kv_blocks,
                      batch_size=r.batch, input_length=input_len, output_length=output_len,
                      **{"gpu_peak_mem(gb)": f"{peak_gb:.2f}", "build_time(s)": f"{max(build_time):.2f}"},
                      tokens_per_sec=f"{r.tokens / r.latency_s:.2f}",
                      **{"percentile50(ms)": f"{_percentile(r.step_ms, 50):.3f}",
                         "percentile95(ms)": f"{_percentile(r.step_ms, 95):.3f}",
                         "percentile99(ms)": f"{_percentile(r.step_ms, 99):.3f}",
                         "latency(ms)": f"{r.latency_s * 1e3:.2f}", "ttft(ms)": f"{r.ttft_s * 1e3:.2f}"},
                      compute_cap=cap, **{"generation_time(ms)": f"{gen_time * 1e3:.2f}"},
                      total_generated_tokens=r.tokens,
                      generation_tokens_per_second=f"{(r.tokens - r.batch) / gen_time:.2f}",
                      mbu=f"{r.mbu:.3f}", **{"copy_bw(gb/s)": f"{bandwidth / 1e9:.0f}",
                                             "gpu_step_p50(ms)": f"{r.gpu_step_ms:.3f}"})
        if model_cfg.num_experts:
            fields["moe_path"] = _moe_path(engine_kernels, model_cfg, r.batch)
        if r.batch in hf_results:
            fields.update(hf_fields(hf_results[r.batch], r.tokens / r.latency_s, r.latency_s, peak_gb))
        report.emit(fields)
    report.save()
    return 0


def _bench_max_load(worker: RankWorker, spec: EngineSpec, max_load: MaxLoad, row: dict, vocab_size: int,
                    device: torch.device, report: BenchReport, async_scheduling: bool = True,
                    pipeline_depth: int | None = None) -> int:
    # Throughput, not inter-token latency: steps that decode may take prefill chunks up to the whole
    # token budget (eager past the largest mixed CUDA graph), as trtllm-bench's max_num_tokens does.
    tokens = max_load.max_num_batched_tokens
    options = EngineOptions(tokens, False, max_decode_step_tokens=tokens, max_num_seqs=max_load.max_batch,
                            async_scheduling=async_scheduling, pipeline_depth=pipeline_depth)
    llm = LLMEngine(worker, spec, options=options)
    torch.cuda.reset_peak_memory_stats(device)
    requests = max_load_requests(max_load.num_requests, row["input_length"], row["output_length"], vocab_size)
    result = run_max_load(llm, requests)
    llm.shutdown()
    worker.close()
    peak = {"gpu_peak_mem(gb)": f"{torch.cuda.max_memory_allocated(device) / 1e9:.2f}"}
    report.emit({**row, **max_load_fields(result), **peak})
    report.save()
    return 0


@dataclass
class HFResult:
    tokens_per_sec: float
    latency_s: float   # the whole generate call: prompt and every new token
    peak_gb: float     # torch's peak allocation during it, the weights included


def hf_fields(hf: HFResult, tokens_per_sec: float, latency_s: float, peak_gb: float) -> dict[str, str]:
    """The baseline's columns of a [BENCHMARK] line, and how much less latency and memory ours takes."""
    return {"hf_tokens_per_sec": f"{hf.tokens_per_sec:.2f}", "speedup_vs_hf": f"{tokens_per_sec / hf.tokens_per_sec:.2f}",
            "hf_latency(ms)": f"{hf.latency_s * 1e3:.2f}", "hf_gpu_peak_mem(gb)": f"{hf.peak_gb:.2f}",
            "latency_reduction_vs_hf": f"{1 - latency_s / hf.latency_s:.3f}",
            "peak_mem_reduction_vs_hf": f"{1 - peak_gb / hf.peak_gb:.3f}"}


def engine_hf_config(engine_dir: Path, vocab_size: int):
    """The transformers config of a random-weights engine: its preset at the engine's vocabulary."""
    meta = json.loads((Path(engine_dir) / "engine.json").read_text()).get("random_weights")
    if not meta:
        raise LaunchError(f"--baseline hf with --engine needs a random-weights engine (`dist-infer build "
                          f"--random-weights PRESET`); {engine_dir} was built from a checkpoint. Measure "
                          "transformers on that checkpoint yourself, or drop --baseline.")
    return preset_hf_config(meta["preset"], vocab_size=vocab_size)


def hf_baseline(hf_config, batch_sizes, input_len, output_len, dtype, device) -> dict[int, HFResult]:
    """transformers `generate` (eager, default cache) on the same shapes and GPU: tokens/s, latency and
    peak GPU memory per batch size."""
    from transformers import AutoModelForCausalLM

    with torch.device(device):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=DTYPES[dtype]).eval()
    gen = torch.Generator().manual_seed(0)
    out = {}
    for batch in batch_sizes:
        ids = torch.randint(0, hf_config.vocab_size, (batch, input_len), generator=gen).to(device)
        kwargs = dict(do_sample=False, max_new_tokens=output_len, min_new_tokens=output_len, pad_token_id=0)
        with torch.inference_mode():
            model.generate(ids, **{**kwargs, "max_new_tokens": 8, "min_new_tokens": 8})
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            res = model.generate(ids, **kwargs)
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        out[batch] = HFResult(batch * (res.shape[1] - input_len) / seconds, seconds,
                              torch.cuda.max_memory_allocated(device) / 1e9)
        log.info("HF generate batch %d: %.1f tok/s, %.0f ms, peak %.2f GB", batch, out[batch].tokens_per_sec,
                 seconds * 1e3, out[batch].peak_gb)
    del model
    torch.cuda.empty_cache()
    return out
