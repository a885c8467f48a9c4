#!/usr/bin/env python3
"""Sweep the launch configs of engine/quant_gpu.py's weight-only kernels on one GPU (issue #10).

For int8_wo, int4_wo (group 128) and fp8 weight-only (M <= 16) at M in {1, 2, 4, 8, 16, 32, 64} rows on
Llama-3-8B's linear shapes (out x in: qkv 6144x4096, o 4096x4096, gate_up 28672x4096, down 4096x14336),
each candidate config (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages, tl.dot or GEMV) is checked
against the dequantized reference and timed; bf16 F.linear (and, for fp8, torch._scaled_mm with the
dynamic per-token activation quantization) is timed on the same shape in the same run.

Timing: the op is captured in a CUDA graph, once per copy of the weight, the copies together larger
than the L2 cache (so every call reads its weight from HBM, as in a decode step where 32 layers pass
through L2), and the graph is replayed REPS times between CUDA events: the median replay / copies.
GB/s counts the bytes read: weights + scales/offsets + activations.

Triton compiles every tile config before the sweep in --jobs worker processes (its on-disk cache then
serves the main process); the sweep stops adding candidates past --budget-s seconds and then times
only the built-in default, so the run stays within its time limit (~3 min on an H100).

Outputs in --out: results.md (tables), results.json (every timing), best_configs.json
({"configs": {mode: {M bucket: {"default" | "OUTxIN": LaunchConfig fields}}}, ...}): load it with
DIST_INFER_QUANT_CONFIGS=best_configs.json, or paste its "configs" into quant_gpu.TUNED_CONFIGS.

    PYTHONPATH=$PWD python3 scripts/tune_quant_kernels.py --out $OUT
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dist_infer.engine import quant, quant_gpu  # noqa: E402
from dist_infer.engine.quant_gpu import LaunchConfig  # noqa: E402
from dist_infer.engine.splitk_gpu import programs_wanted  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # out x in
M_VALUES = (1, 2, 4, 8, 16, 32, 64)
MODES = ("int8_wo", "int4_wo", "fp8")
GROUP = 128
L2_FLUSH_BYTES = 160e6   # weight copies per timing add up to at least this (H100 L2: 50 MB)
MAX_COPIES = 24
REPS = 50
SPLITS = (0, 1, 2, 4, 8)  # 0: quant_gpu's automatic split
DTYPE = torch.bfloat16

# (block_n, block_k, num_warps, num_stages): tl.dot tiles for 16-row tiles, for 32/64-row tiles, GEMV tiles
DOT_SMALL = [(64, 128, 4, 3), (32, 128, 4, 3), (64, 128, 4, 4), (64, 256, 4, 3), (32, 256, 4, 4),
             (128, 128, 4, 3), (128, 128, 8, 3), (128, 256, 8, 3), (64, 64, 4, 4)]
DOT_LARGE = [(64, 128, 4, 3), (128, 128, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 8, 4), (64, 256, 4, 3)]
GEMV = [(8, 256, 4, 3), (16, 256, 4, 3), (16, 128, 4, 3), (32, 128, 4, 3), (32, 256, 8, 3), (64, 128, 8, 3)]
GEMV_MAX_M = 4


def tiles(mode: str, m: int) -> list[LaunchConfig]:
    """Candidate tile configs (split_k left 0) for `mode` at m rows; INT4's K tile stays inside a group."""
    dot = DOT_SMALL if m <= 16 else DOT_LARGE
    out = [LaunchConfig(bn, bk, 0, w, s, True) for bn, bk, w, s in dot]
    if m <= GEMV_MAX_M:
        out += [LaunchConfig(bn, bk, 0, w, s, False) for bn, bk, w, s in GEMV]
    if mode == "int4_wo":
        out = [c for c in out if c.block_k <= GROUP]
    return list(dict.fromkeys(out))


def weight_bytes(mode: str, n: int, k: int) -> int:
    if mode == "bf16":
        return 2 * n * k
    if mode == "int4_wo":
        return n * k // 2 + 2 * 2 * n * (k // GROUP)  # packed codes + bf16 scales and offsets
    return n * k + 4 * n  # int8 / fp8 codes + float32 scales


# ---------------------------------------------------------------- weights and ops


def quantized(mode: str, w: torch.Tensor) -> list[torch.Tensor]:
    """The op's arguments after x for weight w [out, in]."""
    if mode == "bf16":
        return [w.to(DTYPE)]
    if mode == "int8_wo":
        return list(quant.quantize_int8(w))
    if mode == "int4_wo":
        return list(quant.quantize_int4(w, GROUP, DTYPE))
    return list(quant.quantize_fp8(w))


def op(mode: str, cfg: LaunchConfig | None = None):
    """x, *params -> y for a kernel mode (cfg: its launch config), a baseline ("bf16", "fp8_scaled_mm")."""
    if mode == "bf16":
        return lambda x, w: F.linear(x, w)
    if mode == "fp8_scaled_mm":
        return quant_gpu.fp8_scaled_mm_linear
    fn = {"int8_wo": quant_gpu.int8_linear, "int4_wo": quant_gpu.int4_linear,
          "fp8": quant_gpu.fp8_weight_only_linear}[mode]
    return lambda x, *p: fn(x, *p, config=cfg)


def reference(mode: str, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    if mode == "int8_wo":
        return quant.int8_linear_reference(x.float(), *params)
    if mode == "int4_wo":
        return quant.int4_linear_reference(x.float(), *params)
    return F.linear(x.float(), quant.dequantize_fp8(*params))  # fp8 weight-only: x not quantized


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def time_ms(fn, x: torch.Tensor, copies: list[list[torch.Tensor]]) -> float:
    """Median GPU time of one fn(x, *params) call, each params copy once per graph replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for params in copies:
            fn(x, *params)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for params in copies:
            fn(x, *params)
    for _ in range(3):
        graph.replay()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(REPS)]
    for start, end in events:
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    del graph
    return statistics.median(s.elapsed_time(e) for s, e in events) / len(copies)


# ---------------------------------------------------------------- parallel compilation


def _compile_chunk(items: list[tuple[str, int, dict]]) -> int:
    """In a worker: launch each (mode, rows, config) once on a small weight, so Triton's disk cache holds it."""
    torch.manual_seed(0)
    w = torch.randn(256, 1024, device="cuda") * 0.02
    params = {mode: quantized(mode, w) for mode in MODES}
    done = 0
    for mode, m, fields in items:
        x = torch.randn(m, 1024, dtype=DTYPE, device="cuda")
        for split in (1, 2):  # bf16 output, and float32 partial sums + the reduction
            try:
                op(mode, LaunchConfig(**{**fields, "split_k": split}))(x, *params[mode])
                done += 1
            except Exception as e:  # noqa: BLE001 - the sweep reports a config that fails
                print(f"compile {mode} m={m} {fields}: {type(e).__name__}: {e}"[:300], file=sys.stderr)
    torch.cuda.synchronize()
    return done


def precompile(work_list: list[tuple[str, int]], jobs: int) -> None:
    """Compile every tile config of each (mode, rows) in `jobs` processes."""
    items = {}
    for mode, m in work_list:
        for cfg in tiles(mode, m):
            rows = quant_gpu._block_m(m, cfg.dot)  # one compiled variant per BLOCK_M
            items[(mode, rows, cfg)] = (mode, rows, dataclasses.asdict(cfg))
    work = list(items.values())
    chunks = [work[i::jobs] for i in range(jobs)]
    t0 = time.time()
    try:
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            n = sum(pool.map(_compile_chunk, chunks))
        print(f"precompiled {n} kernel variants in {time.time() - t0:.0f} s ({jobs} processes)", flush=True)
    except Exception as e:  # noqa: BLE001 - the sweep then compiles as it goes
        print(f"parallel precompile failed ({type(e).__name__}: {e}); compiling during the sweep", flush=True)


# ---------------------------------------------------------------- the sweep


def sweep_one(mode, m, shape, w, x, deadline, rows_out):
    """Time every candidate of (mode, m, shape); append result dicts to rows_out."""
    n, k = shape
    params = quantized(mode, w)
    ncopies = min(MAX_COPIES, max(1, math.ceil(L2_FLUSH_BYTES / weight_bytes(mode, n, k))))
    copies = [params] + [[p.clone() for p in params] for _ in range(ncopies - 1)]
    ref = reference(mode, x, params)
    cands = [LaunchConfig()] + [dataclasses.replace(c, split_k=s) for c in tiles(mode, m) for s in SPLITS]
    seen = set()
    for i, cfg in enumerate(dict.fromkeys(cands)):
        if i and time.time() > deadline:
            break
        fn = op(mode, cfg)
        try:
            err = rel_err(fn(x, *params), ref)
            if err > 1e-2:
                raise RuntimeError(f"wrong result: relative error {err:.3g}")
            key = _effective(mode, cfg, m, n, k)
            if key in seen:  # same launch as one already timed (e.g. split 0 == split 2)
                continue
            seen.add(key)
            ms = time_ms(fn, x, copies)
        except Exception as e:  # noqa: BLE001
            print(f"  {mode} M={m} {n}x{k} {cfg}: {type(e).__name__}: {str(e)[:200]}", flush=True)
            continue
        rows_out.append({"mode": mode, "m": m, "shape": f"{n}x{k}", "config": dataclasses.asdict(cfg), "ms": ms,
                         "default": i == 0, "err": err})
    del copies
    torch.cuda.empty_cache()


def _effective(mode, cfg, m, n, k):
    """The launch cfg makes at this shape: the split count resolved (so equal launches are timed once)."""
    block_k = quant_gpu.int4_block_k(GROUP, cfg.block_k) if mode == "int4_wo" else cfg.block_k
    c = dataclasses.replace(cfg, block_k=block_k)
    bm = quant_gpu._block_m(m, c.dot)
    k_tiles = -(-k // c.block_k)
    programs = -(-n // c.block_n) * -(-m // bm)
    splits = quant_gpu._splits(c, programs, k_tiles, programs_wanted(torch.empty(0, device="cuda")))
    per = -(-k_tiles // splits) * c.block_k
    return dataclasses.replace(c, split_k=-(-k // per))


def baselines(m, shape, w, x, modes):
    n, k = shape
    out = {}
    for base in ["bf16"] + (["fp8_scaled_mm"] if "fp8" in modes and m <= quant_gpu.FP8_WEIGHT_ONLY_MAX_TOKENS else []):
        params = quantized("bf16" if base == "bf16" else "fp8", w)
        wmode = "bf16" if base == "bf16" else "fp8"
        ncopies = min(MAX_COPIES, max(1, math.ceil(L2_FLUSH_BYTES / weight_bytes(wmode, n, k))))
        copies = [params] + [[p.clone() for p in params] for _ in range(ncopies - 1)]
        out[base] = time_ms(op(base), x, copies)
        del copies
    torch.cuda.empty_cache()
    return out


def best_table(results, modes, m_values):
    """{mode: {bucket: {"default": fields, "OUTxIN": fields}}}: per shape the fastest; default the least total."""
    configs = {}
    for mode in modes:
        for m in m_values:
            rows = [r for r in results if r["mode"] == mode and r["m"] == m]
            if not rows:
                continue
            entry = {}
            totals = {}
            for shape in {r["shape"] for r in rows}:
                best = min((r for r in rows if r["shape"] == shape), key=lambda r: r["ms"])
                entry[shape] = best["config"]
            for r in rows:
                key = json.dumps(r["config"], sort_keys=True)
                totals.setdefault(key, []).append(r["ms"])
            full = {c: sum(t) for c, t in totals.items() if len(t) == len(SHAPES)}
            if full:
                entry = {"default": json.loads(min(full, key=full.get)), **entry}
            configs.setdefault(mode, {})[str(m)] = entry
    return configs


def report(results, base, modes, m_values, out_dir: Path):
    lines = ["| mode | M | shape | best ms | GB/s | vs bf16 | vs default cfg | vs _scaled_mm | best config |",
             "|---|---|---|---|---|---|---|---|---|"]
    layer_ms = {}
    for mode in modes:
        for m in m_values:
            for name, (n, k) in SHAPES.items():
                shape = f"{n}x{k}"
                rows = [r for r in results if r["mode"] == mode and r["m"] == m and r["shape"] == shape]
                if not rows:
                    continue
                best = min(rows, key=lambda r: r["ms"])
                default = next((r["ms"] for r in rows if r["default"]), float("nan"))
                b = base[(m, shape)]
                gbs = (weight_bytes(mode, n, k) + 2 * m * k) / best["ms"] / 1e6
                sm = f"{b['fp8_scaled_mm'] / best['ms']:.2f}x" if "fp8_scaled_mm" in b and mode == "fp8" else ""
                cfg = best["config"]
                desc = (f"{'dot' if cfg['dot'] else 'gemv'} N{cfg['block_n']} K{cfg['block_k']} "
                        f"split{cfg['split_k']} w{cfg['num_warps']} s{cfg['num_stages']}")
                lines.append(f"| {mode} | {m} | {name} {shape} | {best['ms'] * 1e3:.1f} us | {gbs:.0f} | "
                             f"{b['bf16'] / best['ms']:.2f}x | {default / best['ms']:.2f}x | {sm} | {desc} |")
                layer_ms.setdefault((mode, m), [0.0, 0.0, 0])
                layer_ms[(mode, m)][0] += best["ms"]
                layer_ms[(mode, m)][1] += b["bf16"]
                layer_ms[(mode, m)][2] += 1
    lines += ["", "Per decoder layer (the 4 linears), x32 layers: linears-only step time at the best configs",
              "| mode | M | layer us | x32 ms | bf16 x32 ms | speedup |", "|---|---|---|---|---|---|"]
    for (mode, m), (q, b, count) in layer_ms.items():
        if count == len(SHAPES):
            lines.append(f"| {mode} | {m} | {q * 1e3:.1f} | {32 * q:.2f} | {32 * b:.2f} | {b / q:.2f}x |")
    text = "\n".join(lines)
    (out_dir / "results.md").write_text(text + "\n")
    print(text, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT") or "out/tune")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    ap.add_argument("--m", nargs="+", type=int, default=list(M_VALUES))
    ap.add_argument("--budget-s", type=float, default=150, help="stop adding candidates after this many seconds")
    ap.add_argument("--jobs", type=int, default=min(12, os.cpu_count() or 1), help="compile processes (0: none)")
    args = ap.parse_args()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, {props.multi_processor_count} SMs; torch {torch.__version__}", flush=True)
    fp8_m = [m for m in args.m if m <= quant_gpu.FP8_WEIGHT_ONLY_MAX_TOKENS]
    if args.jobs:
        precompile([(md, m) for md in args.modes for m in (fp8_m if md == "fp8" else args.m)], args.jobs)
    deadline = t0 + args.budget_s
    results, base = [], {}
    torch.manual_seed(0)
    for m in sorted(args.m):  # small M first: batch-1 decode matters most if the budget runs out
        for name, (n, k) in SHAPES.items():
            w = torch.randn(n, k, device="cuda") * 0.02
            x = torch.randn(m, k, dtype=DTYPE, device="cuda")
            base[(m, f"{n}x{k}")] = baselines(m, (n, k), w, x, args.modes)
            for mode in args.modes:
                if mode != "fp8" or m <= quant_gpu.FP8_WEIGHT_ONLY_MAX_TOKENS:
                    sweep_one(mode, m, (n, k), w, x, deadline, results)
            del w
        print(f"M={m} done at {time.time() - t0:.0f} s", flush=True)
    configs = best_table(results, args.modes, args.m)
    meta = {"device": props.name, "torch": torch.__version__, "triton": __import__("triton").__version__,
            "seconds": round(time.time() - t0), "budget_hit": time.time() > deadline}
    (out_dir / "best_configs.json").write_text(json.dumps({"configs": configs, "meta": meta}, indent=1) + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {"results": results, "baselines": {f"{m} {s}": v for (m, s), v in base.items()}, "meta": meta}) + "\n")
    report(results, base, args.modes, args.m, out_dir)
    print(f"wrote {out_dir}/best_configs.json, results.md, results.json in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
