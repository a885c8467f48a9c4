"""Grouped MoE kernels for decode-size steps (engine/kernels.py `GpuKernels.moe_experts`).

At decode a Mixtral layer's tokens pick few experts (batch 1: 2 of 8), yet the dense,
graph-safe path runs every expert on every token and so reads all E experts' weights. Here
three kernels read each *chosen* expert's weights once, however many of the step's tokens
chose it, and never touch the others:

1. `_gate_up_kernel`, grid (slots, I tiles): slot s is the s-th distinct expert chosen in
   the step (found in the kernel from `chosen`: no host sync). It multiplies every token by
   that expert's gate and up rows, and stores silu(gate) * up * routing weight
   (0 for tokens that did not choose it) into act [S, N, I].
2. `_down_kernel`, grid (H tiles, slots, K splits): act[s] @ down^T into float32 partial
   sums [S * splits, N, H]; slots past the number of distinct experts store zeros.
3. `splitk_gpu.sum_splits`: the partial sums added up, cast to x's dtype: out [N, H].

S = min(N * k, E) slots cover every distinct expert a step can choose; the grid, the buffers
and every launch depend on shapes alone, so the op is captured in a CUDA graph as it is.
Slots that are not used exit at once (the kernel's branch, not the host's).

Expert weights stay where the engine loaded them: each expert's gate_up_proj.weight
[2I, H] and down_proj.weight [H, I] (I = intermediate/tp) is reached as expert 0's weight (a
kernel argument) + the expert's offset from it in elements (`ExpertTables`: int64 [E] each,
on the device), built once per layer on the first (eager) call, e.g. in the graph runner's
warm-up. Stacking the experts into one [E, 2I, H] tensor would need a second copy of each
layer while it is built (2.8 GB at 8x7B) and would replace the parameters that refit's
in-place swap and the captured graphs rely on; offsets need neither and survive an in-place
refit, since the addresses stay the same. (A table of raw pointers, cast in the kernel,
would work too, but Triton cannot know such a pointer's alignment and compiles 2-byte loads
without cp.async pipelining; base + offset compiles to 16-byte cp.async, checked on the
sm_90 PTX.)

The kernels also run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1): see
tests/engine/test_moe_gpu.py.
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl

from dist_infer.engine.splitk_gpu import programs_wanted, sum_splits
from dist_infer.errors import EngineError

PICKS_PER_EXPERT = 2    # the kernels run while N * k <= this * E (see use_grouped_kernel)
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
ENV = "DIST_INFER_MOE_KERNEL"


@dataclasses.dataclass(frozen=True)
class MoeLaunchConfig:
    block_i: int = 32      # gate_up: intermediate rows per program (each of gate and up)
    block_h: int = 128     # gate_up: hidden columns per loop step
    block_out: int = 32    # down: output columns per program
    block_k: int = 128     # down: intermediate columns per loop step
    split_k: int = 0       # down: programs along I per (tile, slot); 0: enough for TARGET_PROGRAMS per SM (splitk_gpu)
    num_warps: int = 4
    num_stages: int = 4


def kernel_enabled() -> bool:
    """$DIST_INFER_MOE_KERNEL: 1 (default) runs the grouped kernels at decode sizes, 0 keeps every
    step on the dense path (the baseline to compare against)."""
    value = os.environ.get(ENV, "1").strip()
    if value not in ("0", "1"):
        raise EngineError(f"{ENV}={value!r}: use 1 (grouped MoE kernels at decode sizes, the default) or 0 "
                          "(every expert on every token).")
    return value == "1"


def use_grouped_kernel(tokens: int, top_k: int, num_experts: int) -> bool:
    """Shapes alone decide (static within a CUDA graph). Past N * k = 2E picks nearly every expert
    is chosen anyway (uniform routing leaves one unchosen with probability (1 - k/E)^N: 10 % at
    N = 8 for Mixtral's top-2 of 8, 1 % at N = 16), so reading only the chosen ones saves little
    and cuBLAS's GEMMs handle the larger row counts better."""
    return 0 < tokens * top_k <= PICKS_PER_EXPERT * num_experts


def grouped_kernel_weights(x: torch.Tensor, chosen: torch.Tensor, experts) -> list | None:
    """The experts' (gate_up, down) weights where the grouped kernels take this step, else None."""
    if not use_grouped_kernel(x.shape[0], chosen.shape[1], len(experts)) or x.dtype not in DTYPES:
        return None
    pairs = dense_weights(experts)
    return pairs if pairs is not None and pairs[0][0].dtype == x.dtype else None


# ---------------------------------------------------------------- expert address tables


@dataclasses.dataclass(frozen=True)
class ExpertTables:
    """Where a layer's expert weights are, as the kernels read them: one expert's weight as the
    base pointer (a kernel argument, so Triton knows its alignment) and every expert's offset from
    it in elements. Pointers loaded from a table and cast would be of unknown alignment, and
    Triton then loads 2 bytes at a time; base + offset (a multiple of `align` elements) keeps
    16-byte loads."""

    gate_up_base: torch.Tensor     # expert 0's gate_up_proj.weight [2I, H]
    gate_up_offsets: torch.Tensor  # int64 [E]: expert e's gate_up weight - base, in elements
    down_base: torch.Tensor        # expert 0's down_proj.weight [H, I]
    down_offsets: torch.Tensor     # int64 [E]
    inter: int                     # I (this rank's slice)
    align: int                     # every offset is a multiple of this many elements (16 bytes' worth, or 1)

    @property
    def num_experts(self) -> int:
        return self.gate_up_offsets.shape[0]


def dense_weights(experts) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Each expert's (gate_up [2I, H], down [H, I]) weight where the kernels can read them: dense,
    without bias, contiguous, one dtype; None otherwise (the dense path)."""
    pairs = []
    for expert in experts:
        gate_up, down = expert.gate_up_proj, expert.down_proj
        if any(linear.method.mode is not None or linear.bias is not None for linear in (gate_up, down)):
            return None
        pairs.append((gate_up.weight, down.weight))
    tensors = [t for pair in pairs for t in pair]
    if any(not t.is_contiguous() or t.dtype != tensors[0].dtype for t in tensors):
        return None
    return pairs


class ExpertTableCache:
    """Each layer's expert offsets (int64 device tensors), keyed by its weights' addresses (an
    in-place refit keeps them; new storage gets new offsets). Built on the first eager call, never
    during a graph capture. It holds no weight: `get` pairs the offsets with the live base weights."""

    def __init__(self):
        self._offsets: dict[tuple, tuple[torch.Tensor, torch.Tensor, int]] = {}

    def get(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> ExpertTables:
        gate_up, down = pairs[0]
        key = (gate_up.device, gate_up.dtype, tuple(gate_up.shape), tuple(down.shape),
               tuple(t.data_ptr() for pair in pairs for t in pair))
        if key not in self._offsets:
            self._offsets[key] = self._build(pairs)
        gate_up_offsets, down_offsets, align = self._offsets[key]
        return ExpertTables(gate_up, gate_up_offsets, down, down_offsets, down.shape[1], align)

    @staticmethod
    def _build(pairs) -> tuple[torch.Tensor, torch.Tensor, int]:
        gate_up, down = pairs[0]
        if gate_up.is_cuda and torch.cuda.is_current_stream_capturing():
            raise EngineError("the MoE expert tables are built on the first eager call; run a step (the graph "
                              "runner's warm-up does) before capturing a CUDA graph.")
        size = gate_up.element_size()
        byte_offsets = [[g.data_ptr() - gate_up.data_ptr(), d.data_ptr() - down.data_ptr()] for g, d in pairs]
        offsets = torch.tensor(byte_offsets, dtype=torch.int64).div(size, rounding_mode="floor").to(gate_up.device)
        aligned = all(b % 16 == 0 for pair in byte_offsets for b in pair) and gate_up.data_ptr() % 16 == 0 \
            and down.data_ptr() % 16 == 0
        return offsets[:, 0].contiguous(), offsets[:, 1].contiguous(), 16 // size if aligned else 1


# ---------------------------------------------------------------- routing inside the kernels


@triton.jit
def _load_picks(Chosen, N, K: tl.constexpr, BLOCK_N: tl.constexpr, K_P2: tl.constexpr):
    # Chosen [N, K] int64 expert ids -> [BLOCK_N, K_P2], -1 where padding
    rows, ks = tl.arange(0, BLOCK_N), tl.arange(0, K_P2)
    mask = (rows[:, None] < N) & (ks[None, :] < K)
    return tl.load(Chosen + rows[:, None] * K + ks[None, :], mask=mask, other=-1)


@triton.jit
def _slot_expert(picks, slot, E: tl.constexpr, E_P2: tl.constexpr):
    """(the slot-th smallest expert id chosen by any row, how many distinct experts were chosen)."""
    ids = tl.arange(0, E_P2)
    hits = tl.sum(tl.sum((picks[:, :, None] == ids[None, None, :]).to(tl.int32), axis=1), axis=0)  # [E_P2]
    used = ((hits > 0) & (ids < E)).to(tl.int32)  # an id past the experts (none in Mixtral) is skipped
    order = tl.cumsum(used, axis=0) - 1  # rank of each chosen id among the chosen ones
    expert = tl.sum(tl.where((used > 0) & (order == slot), ids, 0), axis=0)
    return expert, tl.sum(used, axis=0)


@triton.jit
def _expert_base(Base, Offsets, expert, ALIGN: tl.constexpr):
    # expert `expert`'s weight: Base + its offset in elements, which is a multiple of ALIGN
    return Base + tl.multiple_of(tl.load(Offsets + expert), ALIGN)


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    """a [M, K] @ b [N, K]^T -> float32 [M, N]; float32 inputs in full precision (not TF32)."""
    if IEEE:
        return tl.dot(a, tl.trans(b), input_precision="ieee")
    return tl.dot(a, tl.trans(b))


# ---------------------------------------------------------------- the kernels


@triton.jit(do_not_specialize=["N"])
def _gate_up_kernel(X, Chosen, Weights, GateUpBase, GateUpOffsets, Act, N, H, I, stride_xn,
                    K: tl.constexpr, K_P2: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_I: tl.constexpr, BLOCK_H: tl.constexpr, IEEE: tl.constexpr, ALIGN: tl.constexpr):
    # X [N, H]; Chosen [N, K] int64, Weights [N, K] float32; expert weight [2I, H]: gate rows, then up rows;
    # Act [S, N, I] in X's dtype
    slot = tl.program_id(0)
    picks = _load_picks(Chosen, N, K, BLOCK_N, K_P2)
    expert, n_used = _slot_expert(picks, slot, E, E_P2)
    if slot >= n_used:
        return
    W = _expert_base(GateUpBase, GateUpOffsets, expert, ALIGN)
    rows = tl.arange(0, BLOCK_N)
    offs_i = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc_gate = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_I), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        x = tl.load(X + rows[:, None] * stride_xn + offs_h[None, :],
                    mask=(rows[:, None] < N) & (offs_h[None, :] < H), other=0.0)      # [BLOCK_N, BLOCK_H]
        w_mask = (offs_i[:, None] < I) & (offs_h[None, :] < H)
        gate = tl.load(W + offs_i[:, None] * H + offs_h[None, :], mask=w_mask, other=0.0)        # [BLOCK_I, BLOCK_H]
        up = tl.load(W + (I + offs_i[:, None]) * H + offs_h[None, :], mask=w_mask, other=0.0)
        acc_gate += _dot(x, gate, IEEE)
        acc_up += _dot(x, up, IEEE)
    ks = tl.arange(0, K_P2)
    weights = tl.load(Weights + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < N) & (ks[None, :] < K),
                      other=0.0)
    row_weight = tl.sum(tl.where(picks == expert, weights, 0.0), axis=1)  # [BLOCK_N]: 0 if the row did not pick it
    act = acc_gate * tl.sigmoid(acc_gate) * acc_up * row_weight[:, None]
    tl.store(Act + slot * N * I + rows[:, None] * I + offs_i[None, :], act.to(Act.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_i[None, :] < I))


@triton.jit(do_not_specialize=["N"])
def _down_kernel(Act, Chosen, DownBase, DownOffsets, Part, N, H, I, K_PER_SPLIT,
                 K: tl.constexpr, K_P2: tl.constexpr, E: tl.constexpr, E_P2: tl.constexpr, SPLITS: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_OUT: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr,
                 ALIGN: tl.constexpr):
    # Act [S, N, I]; expert weight [H, I]; Part [S * SPLITS, N, H] float32 (or [N, H] in Act's dtype if S*SPLITS == 1)
    offs_o = tl.program_id(0) * BLOCK_OUT + tl.arange(0, BLOCK_OUT)
    slot, split = tl.program_id(1), tl.program_id(2)
    rows = tl.arange(0, BLOCK_N)
    expert, n_used = _slot_expert(_load_picks(Chosen, N, K, BLOCK_N, K_P2), slot, E, E_P2)
    acc = tl.zeros((BLOCK_N, BLOCK_OUT), dtype=tl.float32)
    if slot < n_used:
        W = _expert_base(DownBase, DownOffsets, expert, ALIGN)
        k_start = split * K_PER_SPLIT
        for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, I), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(Act + slot * N * I + rows[:, None] * I + offs_k[None, :],
                        mask=(rows[:, None] < N) & (offs_k[None, :] < I), other=0.0)   # [BLOCK_N, BLOCK_K]
            w = tl.load(W + offs_o[:, None] * I + offs_k[None, :],
                        mask=(offs_o[:, None] < H) & (offs_k[None, :] < I), other=0.0)  # [BLOCK_OUT, BLOCK_K]
            acc += _dot(a, w, IEEE)
    part = slot * SPLITS + split
    tl.store(Part + part * N * H + rows[:, None] * H + offs_o[None, :], acc.to(Part.dtype.element_ty),
             mask=(rows[:, None] < N) & (offs_o[None, :] < H))


# ---------------------------------------------------------------- launch


def _down_splits(cfg: MoeLaunchConfig, programs: int, inter: int, wanted: int) -> tuple[int, int]:
    """(splits of I, I columns per split) for the down projection: cfg.split_k, or enough splits
    for `wanted` programs with >= 4 K tiles each; a split holds whole K tiles."""
    k_tiles = triton.cdiv(inter, cfg.block_k)
    splits = cfg.split_k or max(1, min(wanted // programs, k_tiles // 4))
    k_per_split = triton.cdiv(k_tiles, max(1, min(splits, k_tiles))) * cfg.block_k
    return triton.cdiv(inter, k_per_split), k_per_split


def _routing_constants(chosen: torch.Tensor, num_experts: int) -> dict:
    tokens, top_k = chosen.shape
    return dict(K=top_k, K_P2=triton.next_power_of_2(top_k), E=num_experts, E_P2=triton.next_power_of_2(num_experts),
                BLOCK_N=max(16, triton.next_power_of_2(tokens)))  # tl.dot needs >= 16 rows


def moe_grouped(x: torch.Tensor, weights: torch.Tensor, chosen: torch.Tensor, tables: ExpertTables,
                config: MoeLaunchConfig | None = None) -> torch.Tensor:
    """x [N, H]; chosen [N, k] expert ids with their routing weights [N, k] (float32) -> the weighted
    sum of the chosen experts' SiLU-gated MLPs [N, H] in x's dtype (partial over TP, like the dense path)."""
    cfg = config or MoeLaunchConfig()
    tokens, hidden = x.shape
    num_experts, inter = tables.num_experts, tables.inter
    slots = min(tokens * chosen.shape[1], num_experts)
    x, chosen, weights = x.contiguous(), chosen.contiguous(), weights.float().contiguous()
    common = dict(_routing_constants(chosen, num_experts), IEEE=x.dtype == torch.float32, ALIGN=tables.align,
                  num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    act = torch.empty(slots, tokens, inter, dtype=x.dtype, device=x.device)  # [S, N, I]
    _gate_up_kernel[(slots, triton.cdiv(inter, cfg.block_i))](
        x, chosen, weights, tables.gate_up_base, tables.gate_up_offsets, act, tokens, hidden, inter, x.stride(0),
        BLOCK_I=cfg.block_i, BLOCK_H=cfg.block_h, **common)
    return _down(act, chosen, tables, cfg, common, hidden)


def _down(act: torch.Tensor, chosen: torch.Tensor, tables: ExpertTables, cfg: MoeLaunchConfig, common: dict,
          hidden: int) -> torch.Tensor:
    # act [S, N, I] -> out [N, H]: one float32 partial sum per (slot, split), added up by one more kernel
    slots, tokens, inter = act.shape
    out_tiles = triton.cdiv(hidden, cfg.block_out)
    splits, k_per_split = _down_splits(cfg, out_tiles * slots, inter, programs_wanted(act))
    out = torch.empty(tokens, hidden, dtype=act.dtype, device=act.device)
    parts = slots * splits
    target = out if parts == 1 else torch.empty(parts, tokens, hidden, dtype=torch.float32, device=act.device)
    _down_kernel[(out_tiles, slots, splits)](
        act, chosen, tables.down_base, tables.down_offsets, target, tokens, hidden, inter, k_per_split, SPLITS=splits,
        BLOCK_OUT=cfg.block_out, BLOCK_K=cfg.block_k, **common)
    return sum_splits(target, out) if parts > 1 else out
