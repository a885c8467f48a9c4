"""The decode/prefill GEMMs of one Llama layer, bf16 against the FP8 path and its parts
(per-token activation quantization, `_scaled_mm` rowwise; for comparison rowwise with fast
accumulation and per-tensor scales with and without it), per shape and row count; then the
kernels that feed them (norm, SiLU-mul) with and without their fused FP8 output; and at one
row, cuBLAS against gemv_gpu's GEMV. One GPU.

    python3 scripts/bench_gemm.py --model llama-3-8b --rows 1024 8192

Each figure is a call's device time: --iters calls captured in one CUDA graph, the median of 5
replays divided by --iters. TFLOP/s counts 2 * rows * out * in (for the quantization, of the GEMM after it).
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from dist_infer.bench import preset_config
from dist_infer.config import ModelConfig
from dist_infer.engine.quant import quantize_fp8
from dist_infer.engine import fused_gpu, gemv_gpu
from dist_infer.engine.quant_gpu import fp8_linear, fp8_quantize_per_token


def layer_shapes(cfg: ModelConfig) -> list[tuple[str, int, int]]:
    """(name, out, in) of a decoder layer's linears at TP=1."""
    up = 2 * cfg.intermediate_size if cfg.gated_mlp else cfg.intermediate_size
    return [("qkv_proj", cfg.q_size + 2 * cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size),
            ("o_proj", cfg.hidden_size, cfg.q_size), ("gate_up_proj", up, cfg.hidden_size),
            ("down_proj", cfg.hidden_size, cfg.intermediate_size)]


def time_us(fn, iters: int) -> float:
    """Device time of one call: `iters` calls captured in a CUDA graph, replayed, averaged (no host
    launch time in it, as in the engine's graphs)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def bench_shape(rows: int, out_f: int, in_f: int, iters: int) -> dict[str, float]:
    x = torch.randn(rows, in_f, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02
    qw, scales = quantize_fp8(w)
    qw, scales = qw.cuda(), scales.cuda()
    xq, x_scales = fp8_quantize_per_token(x)
    one = torch.ones((), device="cuda")  # per-tensor scales: cuBLASLt's FP8 path instead of the rowwise kernel

    def scaled_mm(scale_a, scale_b, fast_accum=False):
        return lambda: torch._scaled_mm(xq, qw.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=torch.bfloat16,
                                        use_fast_accum=fast_accum)
    return {
        "bf16": time_us(lambda: F.linear(x, w), iters),
        "fp8_quant_x": time_us(lambda: fp8_quantize_per_token(x), iters),
        "fp8_scaled_mm": time_us(scaled_mm(x_scales, scales[None, :]), iters),
        "rowwise_fast_acc": time_us(scaled_mm(x_scales, scales[None, :], True), iters),
        "per_tensor": time_us(scaled_mm(one, one), iters),
        "per_tensor_fast": time_us(scaled_mm(one, one, True), iters),
        "fp8_linear": time_us(lambda: fp8_linear(x, qw, scales), iters),
    }


def bench_producers(rows: int, cfg: ModelConfig, iters: int) -> None:
    """The kernels before the FP8 GEMMs: unquantized output + a quantization kernel, against the
    fused FP8 output (fused_gpu's fp8_out)."""
    h, inter = cfg.hidden_size, cfg.intermediate_size
    x, res = (torch.randn(rows, h, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.ones(h, device="cuda", dtype=torch.bfloat16)
    gate_up = torch.randn(rows, 2 * inter, device="cuda", dtype=torch.bfloat16)
    cases = {
        "add_rmsnorm": lambda: fused_gpu.add_rmsnorm(x, w, 1e-5, res),
        "add_rmsnorm + quantize": lambda: fp8_quantize_per_token(fused_gpu.add_rmsnorm(x, w, 1e-5, res)[0]),
        "add_rmsnorm fp8_out": lambda: fused_gpu.add_rmsnorm(x, w, 1e-5, res, fp8_out=True),
        "silu_mul": lambda: fused_gpu.silu_mul(gate_up),
        "silu_mul + quantize": lambda: fp8_quantize_per_token(fused_gpu.silu_mul(gate_up)),
        "silu_mul fp8_out": lambda: fused_gpu.silu_mul(gate_up, fp8_out=True),
    }
    for name, fn in cases.items():
        print(f"{rows:>6} {name:>24} {time_us(fn, iters):>9.1f} us")


def bench_gemv(cfg: ModelConfig, vocab: int, iters: int) -> None:
    """One row: cuBLAS (F.linear) against gemv_gpu, each call on the next of enough weight copies
    that no call finds its weight in L2 (o_proj's 33.5 MB fits the H100's 50 MB), as in a step."""
    for name, out_f, in_f in layer_shapes(cfg) + [("lm_head", vocab, cfg.hidden_size)]:
        copies = max(2, -(-400_000_000 // (out_f * in_f * 2)))
        ws = [torch.randn(out_f, in_f, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, in_f, device="cuda", dtype=torch.bfloat16)
        turn = iter(range(10**9))
        t_cublas = time_us(lambda: F.linear(x, ws[next(turn) % copies]), iters)
        t_gemv = time_us(lambda: gemv_gpu.gemv(x, ws[next(turn) % copies]), iters)
        gb = out_f * in_f * 2 / 1e9
        print(f"     1 {name:>13} {f'{out_f}x{in_f}':>12} cuBLAS {t_cublas:7.1f} us ({gb / t_cublas * 1e6:5.0f} GB/s)  "
              f"gemv {t_gemv:7.1f} us ({gb / t_gemv * 1e6:5.0f} GB/s)  {t_cublas / t_gemv:.2f}x")
        del ws


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="llama-3-8b")
    p.add_argument("--rows", type=int, nargs="+", default=[1024, 8192])
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    cfg = ModelConfig.from_hf(preset_config(args.model))
    print(f"{torch.cuda.get_device_name()}; torch {torch.__version__}; us per call (TFLOP/s)")
    cols = ["bf16", "fp8_quant_x", "fp8_scaled_mm", "fp8_linear", "rowwise_fast_acc", "per_tensor", "per_tensor_fast"]
    print(f"{'rows':>6} {'layer':>13} {'out x in':>12} " + " ".join(f"{c:>18}" for c in cols) + "  fp8/bf16")
    for rows in args.rows:
        totals = dict.fromkeys(cols, 0.0)
        for name, out_f, in_f in layer_shapes(cfg):
            r = bench_shape(rows, out_f, in_f, args.iters)
            tflops = {c: 2 * rows * out_f * in_f / (r[c] * 1e-6) / 1e12 for c in cols}
            print(f"{rows:>6} {name:>13} {f'{out_f}x{in_f}':>12} "
                  + " ".join(f"{r[c]:>9.1f} ({tflops[c]:>5.0f})" for c in cols) + f"  {r['bf16'] / r['fp8_linear']:.2f}x")
            for c in cols:
                totals[c] += r[c]
        print(f"{rows:>6} {'layer total':>13} {'':>12} " + " ".join(f"{totals[c]:>18.1f}" for c in cols)
              + f"  {totals['bf16'] / totals['fp8_linear']:.2f}x")
    print("One row, bf16 (batch-1 decode), weights not in L2:")
    bench_gemv(cfg, cfg.vocab_size, args.iters)
    print("The FP8 GEMMs' producers (hidden and intermediate sizes of the model, TP=1):")
    for rows in args.rows:
        bench_producers(rows, cfg, args.iters)


if __name__ == "__main__":
    main()
