"""Weight quantization at build time (`dist-infer build --quant`, engine/quant.py), on CPU.

Engines of tiny random Llama/Qwen2 models are built for every mode and layout
in-process (the function `dist-infer build` calls), and each layout's ranks run
in this process: the TP ranks of a stage as threads joined by a thread-backed
group, the stages one after another. That gives every position's logits of a
TP x PP engine, to compare with the TP=1 x PP=1 engine of the same mode. The
CLI is exercised for what only it does: flags, exit codes, engine.json
validation at load, and an `mpirun` build.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from conftest import make_tiny_model, run_cli, write_prompts
from thread_group import ThreadGroup
from dist_infer.comm.base import LocalCommunicator
from dist_infer.config import BuildConfig, QuantConfig
from dist_infer.engine import quant
from dist_infer.engine.build import DTYPES, build, rank_weights_file
from dist_infer.engine.kernels import QuantizedActivation, ReferenceKernels
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch
from dist_infer.engine.model import StageModel, local_heads
from dist_infer.engine.runtime import EngineSpec, RankEngine
from dist_infer.errors import EngineError, LayoutError
from dist_infer.partition import partition

MODES = ["int8_wo", "int4_wo", "fp8"]
LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2)]
GROUP = 32  # tiny models: hidden 64, o_proj 64/2 = 32 inputs per rank at tp=2
TIMEOUT = 120
PROMPTS = [[5, 17, 33, 2, 250, 8, 91], [7, 7, 120, 64, 3, 299, 14, 56, 11, 42, 200, 1, 9]]


# ---------------------------------------------------------------- running a TP x PP engine in one process

def load_stage(engine: Path, rank: int, group) -> StageModel:
    """One rank's model as RankEngine builds it, with the engine's quantization (the load check
    is RankEngine's own: the file's tensors must be exactly the model's parameters)."""
    spec = EngineSpec.read(engine)
    mapping = spec.mapping.with_rank(rank)
    model = StageModel(spec.model, mapping, group, spec.vocab_size_padded, DTYPES[spec.build.dtype],
                       spec.build.quant_config)
    RankEngine._assign(SimpleNamespace(model=model, mapping=mapping), load_file(engine / rank_weights_file(rank)))
    return model


def prefill_batch(prompts: list[list[int]], block_size: int = 16) -> StepBatch:
    """All prompts in one prefill step, logits requested at every token."""
    tables, next_block = [], 1
    for p in prompts:
        n = -(-len(p) // block_size)
        tables.append(list(range(next_block, next_block + n)))
        next_block += n
    batch = StepBatch.build([(p, 0, t) for p, t in zip(prompts, tables)], block_size)
    return dataclasses.replace(batch, last_token_index=torch.arange(batch.num_tokens))


def _run_rank(engine: Path, rank: int, group, x: torch.Tensor, batch: StepBatch) -> torch.Tensor:
    model = load_stage(engine, rank, group)
    _, kv_heads = local_heads(model.cfg, group.size)
    blocks = int(batch.block_tables.max()) + 1
    cache = PagedKVCache(len(model.layer_ids), blocks, 16, kv_heads, model.cfg.head_dim, model.dtype)
    with torch.inference_mode():
        hidden = model(x, batch, cache)
        return model.logits(hidden, batch) if model.lm_head is not None else hidden


def engine_logits(engine: Path, prompts: list[list[int]] = PROMPTS) -> torch.Tensor:
    """float32 logits [tokens, vocab] at every prompt position; TP ranks as threads, stages in turn."""
    spec = EngineSpec.read(engine)
    tp, pp = spec.mapping.tp, spec.mapping.pp
    batch = prefill_batch(prompts)
    x = batch.input_ids
    for stage in range(pp):
        group, outs, errors = ThreadGroup(tp), [None] * tp, []

        def work(t, x=x, group=group, outs=outs, errors=errors):
            try:
                outs[t] = _run_rank(engine, stage * tp + t, group.member(t) if tp > 1 else LocalCommunicator(), x, batch)
            except BaseException as exc:  # surfaced below; a dead thread would hang its peers' barrier
                errors.append(exc)
                group.barrier.abort()

        threads = [threading.Thread(target=work, args=(t,)) for t in range(tp)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        if errors:
            raise errors[0]
        x = outs[0]
    return x


# ---------------------------------------------------------------- engines

class Engines:
    """Partition each (model, layout) once and build each (model, layout, options) once, in-process."""

    def __init__(self, root: Path, models: dict[str, Path]):
        self.root, self.models, self.ckpts, self.built = root, models, {}, {}

    def checkpoint(self, arch: str, tp: int, pp: int) -> Path:
        key = (arch, tp, pp)
        if key not in self.ckpts:
            self.ckpts[key] = self.root / f"ckpt-{arch}-tp{tp}pp{pp}"
            partition(self.models[arch], tp, pp, self.ckpts[key], progress=False)
        return self.ckpts[key]

    def get(self, arch: str, tp: int, pp: int, **options) -> Path:
        key = (arch, tp, pp, tuple(sorted(options.items())))
        if key not in self.built:
            out = self.root / f"engine-{len(self.built)}-{arch}-tp{tp}pp{pp}"
            build(self.checkpoint(arch, tp, pp), out, BuildConfig(**options), LocalCommunicator())
            self.built[key] = out
        return self.built[key]


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quant-models")
    make_tiny_model(root / "llama", "llama")
    make_tiny_model(root / "qwen2", "qwen2")  # tied embeddings, q/k/v bias, MQA
    return {"llama": root / "llama", "qwen2": root / "qwen2"}


@pytest.fixture(scope="module")
def engines(tmp_path_factory, hf_models) -> Engines:
    return Engines(tmp_path_factory.mktemp("quant-engines"), hf_models)


def quant_options(mode: str | None, **extra) -> dict:
    return dict(quant=mode, quant_group_size=GROUP, **extra) if mode == "int4_wo" else dict(quant=mode, **extra)


# ---------------------------------------------------------------- quantize / dequantize

def test_int8_error_is_at_most_half_a_step_per_channel():
    w = torch.randn(48, 96) * torch.linspace(0.01, 3, 48)[:, None]  # rows of very different ranges
    w[5] = 0
    q, scales = quant.quantize_int8(w)
    assert q.dtype == torch.int8 and scales.shape == (48,) and scales.dtype == torch.float32
    err = (quant.dequantize_int8(q, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-7).all()
    assert torch.equal(q.abs().amax(dim=1)[torch.arange(48) != 5], torch.full((47,), 127, dtype=torch.int8))
    assert (q[5] == 0).all()


def test_int4_packs_two_per_byte_and_errs_at_most_half_a_step_per_group():
    torch.manual_seed(0)
    codes = torch.randint(0, 16, (6, 64), dtype=torch.uint8)
    packed = quant.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 32)
    assert torch.equal(quant.unpack_int4(packed), codes)
    assert packed[0, 0].item() == codes[0, 0] | (codes[0, 1] << 4)  # even column low nibble

    w = torch.randn(8, 128)
    w[:, 32:64] *= 100  # one group of large values must not coarsen the others
    w[3, :32] = 0.25    # a constant group is exact
    w[4, 64:96] = w[4, 64:96].abs() + 3  # an all-positive group uses all 16 codes too
    q, scales, offsets = quant.quantize_int4(w, 32)
    assert q.shape == (8, 64) and scales.shape == offsets.shape == (8, 4) and (scales > 0).all()
    groups = w.reshape(8, 4, 32)
    err = (quant.dequantize_int4(q, scales, offsets) - w).reshape(8, 4, 32)
    # A value inside its group's grid [offset, offset + 15 scale] rounds to the nearest code; a
    # clipped one errs by more, but each group's squared error is at most plain min/max's.
    pos = (groups - offsets[..., None]) / scales[..., None]
    inside = (pos >= -0.5) & (pos <= 15.5)
    assert (err.abs()[inside] <= scales[..., None].expand_as(err)[inside] / 2 + 1e-5).all()
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    step = ((hi - lo) / 15).clamp_min(1e-30)
    plain_err = (torch.round((groups - lo) / step).clamp(0, 15) * step + lo - groups).square().sum(-1)
    assert (err.square().sum(-1) <= plain_err + 1e-6).all()
    assert err[:, 0].abs().max() < 0.4  # a group of N(0, 1) values: range ~5, step ~0.33 (clipped: more)
    assert (err[3, 0] == 0).all() and err[4, 2].abs().max() < 0.2


def test_int4_is_exact_on_a_grid_of_16_levels_per_group():
    """Weights that already lie on an asymmetric 4-bit grid per group (a GGUF Q4_1 or AWQ
    checkpoint dequantized) come back exactly: SmolLM2's g32 quality is the source's."""
    codes = torch.randint(0, 16, (4, 64))
    codes[:, 0], codes[:, 32], codes[:, 1], codes[:, 33] = 0, 0, 15, 15  # every group spans its grid
    scale = torch.rand(4, 2) + 0.1
    low = torch.randn(4, 2)
    w = (codes.reshape(4, 2, 32) * scale[..., None] + low[..., None]).reshape(4, 64)
    q, scales, offsets = quant.quantize_int4(w, 32)
    torch.testing.assert_close(quant.dequantize_int4(q, scales, offsets), w, rtol=0, atol=1e-6)


def test_fp8_error_is_relative_to_each_value():
    w = torch.randn(16, 64) * 0.05
    q, scales = quant.quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and q.float().abs().amax() == 448
    err = (quant.dequantize_fp8(q, scales) - w).abs()
    # e4m3 keeps 3 mantissa bits: half an ulp is 2^-4 of a normal value; subnormals step 2^-9 x scale.
    assert (err <= torch.maximum(w.abs() * 2**-4, scales[:, None] * 2**-10) + 1e-9).all()

    x = torch.randn(5, 64) * torch.tensor([1e-3, 1, 10, 100, 0])[:, None]
    xq, x_scales = quant.quantize_fp8_per_token(x)
    assert x_scales.shape == (5, 1)
    x_err = (quant.dequantize_fp8(xq, x_scales) - x).abs()
    assert (x_err <= torch.maximum(x.abs() * 2**-4, x_scales * 2**-10) + 1e-9).all()


def test_row_absmax_gives_the_unsharded_scales_to_a_column_shard():
    """A row-parallel shard quantized with its full rows' absmax is exactly the unsharded slice."""
    w = torch.randn(16, 64)
    for quantize in (quant.quantize_int8, quant.quantize_fp8):
        full_q, full_s = quantize(w)
        shard_q, shard_s = quantize(w[:, 32:], row_absmax=w.abs().amax(dim=1))
        assert torch.equal(shard_s, full_s)
        assert torch.equal(shard_q.view(torch.uint8), full_q[:, 32:].contiguous().view(torch.uint8))


def test_fp8_reference_linear_takes_an_activation_quantized_before():
    x = torch.randn(6, 64, dtype=torch.bfloat16)
    qweight, scales = quant.quantize_fp8(torch.randn(32, 64) * 0.05)
    pre = QuantizedActivation(*quant.quantize_fp8_per_token(x), x.dtype)
    y = quant.fp8_linear_reference(pre, qweight, scales)
    assert y.dtype == torch.bfloat16 and torch.equal(y, quant.fp8_linear_reference(x, qweight, scales))


class HintedKernels(ReferenceKernels):
    """The reference, except that norms and silu_mul quantize their output when the next linear
    asks (as the GPU kernels do), recording every hint they get."""

    def __init__(self):
        self.hints = []

    def _maybe_quantize(self, op, out, hint):
        self.hints.append((op, hint))
        return QuantizedActivation(*quant.quantize_fp8_per_token(out), out.dtype) if hint == "fp8" else out

    def add_rms_norm(self, x, weight, eps, residual=None, reduce=None, quant=None):
        out, residual = super().add_rms_norm(x, weight, eps, residual, reduce)
        return self._maybe_quantize("norm", out, quant), residual

    def silu_mul(self, gate_up, quant=None):
        return self._maybe_quantize("silu_mul", super().silu_mul(gate_up), quant)

    def dense_linear(self, x, weight, bias=None):
        self.hints.append(("dense_linear", None))
        return super().dense_linear(x, weight, bias)


@pytest.mark.parametrize("mode", [None, "fp8", "int8_wo"])
def test_norms_and_activations_learn_the_next_linears_input_format(engines, mode):
    """Every decoder layer tells its two norms and silu_mul what the next linear takes: "fp8" for
    FP8 linears (which then get their input quantized by the kernel before, to the same logits),
    None otherwise; the final norm (LM head's input, dense) is never asked to quantize."""
    engine = engines.get("llama", 1, 1, **quant_options(mode))
    batch = prefill_batch(PROMPTS)
    expected = _run_rank(engine, 0, LocalCommunicator(), batch.input_ids, batch)
    model = load_stage(engine, 0, LocalCommunicator())
    kernels = HintedKernels()
    model.use_kernels(kernels)
    _, kv_heads = local_heads(model.cfg, 1)
    cache = PagedKVCache(len(model.layer_ids), int(batch.block_tables.max()) + 1, 16, kv_heads, model.cfg.head_dim,
                         model.dtype)
    with torch.inference_mode():
        logits = model.logits(model(batch.input_ids, batch, cache), batch)
    assert torch.equal(logits, expected)
    want = "fp8" if mode == "fp8" else None
    dense = kernels.hints.count(("dense_linear", None))
    *layer_hints, final = [h for h in kernels.hints if h[0] != "dense_linear"]
    layers = len(model.layer_ids)
    assert layer_hints.count(("norm", want)) == 2 * layers and layer_hints.count(("silu_mul", want)) == layers
    assert len(layer_hints) == 3 * layers and final == ("norm", None)
    # Dense linears run through the kernel seam (GPU: the one-row GEMV): all 4 a layer and the
    # LM head unquantized; only the LM head (kept dense) when quantized.
    assert dense == (4 * layers + 1 if mode is None else 1)


# ---------------------------------------------------------------- sharded == unsharded

def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("mode", MODES)
def test_tp_shards_are_slices_of_the_unsharded_quantized_weights(engines, mode):
    """Quantization commutes with TP slicing: each tp=2 rank holds exactly its slice of the tp=1
    engine's qweight and scales: rows of column-parallel gate_up, columns of row-parallel
    o_proj/down_proj with the whole rows' scales (per-channel) or their own groups (INT4)."""
    def raw(t):  # compare bits (FP8 has no torch.equal)
        return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t

    full = load_file(engines.get("llama", 1, 1, **quant_options(mode)) / rank_weights_file(0))
    two = engines.get("llama", 2, 1, **quant_options(mode))
    for rank in range(2):
        part = load_file(two / rank_weights_file(rank))
        for name in ("layers.1.self_attn.o_proj", "layers.1.mlp.down_proj"):  # split along inputs
            q, scales = full[f"{name}.qweight"], full[f"{name}.scales"]
            cols = q.shape[1] // 2
            assert torch.equal(raw(part[f"{name}.qweight"]), raw(q[:, rank * cols:(rank + 1) * cols]))
            want = scales if scales.ndim == 1 else scales[:, rank * scales.shape[1] // 2:(rank + 1) * scales.shape[1] // 2]
            assert torch.equal(part[f"{name}.scales"], want), name
            if mode == "int4_wo":
                offsets = full[f"{name}.offsets"]
                half = offsets.shape[1] // 2
                assert torch.equal(part[f"{name}.offsets"], offsets[:, rank * half:(rank + 1) * half]), name
        gate_up = "layers.1.mlp.gate_up_proj"  # [gate; up] rows, each split over tp
        rows = [slice(h * 128 + rank * 64, h * 128 + (rank + 1) * 64) for h in range(2)]
        for t in ("qweight", "scales", "offsets")[:3 if mode == "int4_wo" else 2]:
            want = torch.cat([full[f"{gate_up}.{t}"][r] for r in rows])
            assert torch.equal(raw(part[f"{gate_up}.{t}"]), raw(want))


@pytest.mark.parametrize("layout", LAYOUTS[1:], ids=[f"tp{t}pp{p}" for t, p in LAYOUTS[1:]])
@pytest.mark.parametrize("mode", MODES)
def test_sharded_quantized_logits_equal_unsharded(engines, mode, layout):
    """The same quantized weights at every layout give the logits of TP=1 x PP=1 within float32
    reordering of the TP sums. Except FP8 at tp > 1: a row-parallel layer's input is sharded and
    quantized per token *per shard* (engine/quant.py), so its activations round differently; there
    the engine must be as close to the unquantized one as TP=1 is (within 20 %), and agree on the
    top-1 token at >= 75 % of positions (measured: 80 % llama, 95 % qwen2; int8/int4: exact)."""
    base = engine_logits(engines.get("llama", 1, 1, **quant_options(mode)))
    logits = engine_logits(engines.get("llama", *layout, **quant_options(mode)))
    assert logits.shape == base.shape == (sum(map(len, PROMPTS)), 301)
    if mode == "fp8" and layout[0] > 1:
        dense = engine_logits(engines.get("llama", 1, 1))
        assert _relative_error(logits, dense) < 1.2 * _relative_error(base, dense)
        assert (logits.argmax(-1) == base.argmax(-1)).float().mean() >= 0.75
    else:
        torch.testing.assert_close(logits, base, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_tied_qwen2_with_quantized_lm_head_shards(engines, mode):
    """--quant-lm-head on a tied model: the head gets its own quantized copy of the table, the
    embedding stays dense; vocab-parallel at tp=2 (and q/k/v bias, MQA) gives the same logits."""
    options = quant_options(mode, quant_lm_head=True)
    one = engines.get("qwen2", 1, 1, **options)
    weights = load_file(one / rank_weights_file(0))
    assert weights["embed.weight"].dtype == torch.float32 and "lm_head.weight" not in weights
    assert weights["lm_head.qweight"].dtype == {"int8_wo": torch.int8, "int4_wo": torch.uint8,
                                                "fp8": torch.float8_e4m3fn}[mode]
    assert weights["layers.0.self_attn.qkv_proj.bias"].dtype == torch.float32
    base = engine_logits(one)
    dense = engine_logits(engines.get("qwen2", 1, 1))
    assert (base - dense).abs().max() > 0  # the head really is quantized
    two = engine_logits(engines.get("qwen2", 2, 1, **options))
    if mode == "fp8":  # activations of row-parallel layers round per shard (see above)
        assert _relative_error(two, dense) < 1.2 * _relative_error(base, dense)
    else:
        torch.testing.assert_close(two, base, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- quality against the unquantized engine

def test_quantized_logits_stay_close_to_unquantized(engines):
    """Relative logit error ||q - dense|| / ||dense|| on the tiny float32 Llama. Its random,
    wide weights amplify weight noise ~5x over 4 layers (measured: int8 3.0 %, fp8 24 %,
    int4 group 32 46 %; SmolLM2's real numbers are in docs/PERFORMANCE.md); the bounds are
    ~1.5x those, and the order int8 < fp8 < int4 must hold."""
    dense = engine_logits(engines.get("llama", 1, 1))
    errors = {m: _relative_error(engine_logits(engines.get("llama", 1, 1, **quant_options(m))), dense) for m in MODES}
    assert errors["int8_wo"] < 0.05 and errors["fp8"] < 0.35 and errors["int4_wo"] < 0.7, errors
    assert errors["int8_wo"] < errors["fp8"] < errors["int4_wo"], errors


def test_int8_greedy_tokens_mostly_match_unquantized(engines):
    """Teacher-forced top-1 agreement of int8_wo with the unquantized engine at every position of
    PROMPTS (20 positions): at least 19 agree. Mismatches can only come from near ties, so a
    broken dequantization (wrong scale axis, nibble order...) fails this at once."""
    dense = engine_logits(engines.get("llama", 1, 1)).argmax(-1)
    int8 = engine_logits(engines.get("llama", 1, 1, quant="int8_wo")).argmax(-1)
    assert (dense == int8).sum().item() >= len(dense) - 1, (dense.tolist(), int8.tolist())


# ---------------------------------------------------------------- engine files

def _tensor_bytes(path: Path) -> dict[str, int]:
    with safe_open(path, "pt") as f:
        return {n: f.get_tensor(n).nbytes for n in f.keys()}


def _linear_bytes(sizes: dict[str, int]) -> int:
    return sum(b for n, b in sizes.items() if n.startswith("layers.") and "_proj." in n and not n.endswith("bias"))


def test_engine_files_shrink_as_expected(engines):
    """Linear layers' bytes (weights + scales) against bf16 weights: int8 ~1/2, int4 ~1/4
    (+ a float32 scale per 64 inputs here); embeddings, norms and the head stay in the model dtype."""
    bf16 = _tensor_bytes(engines.get("llama", 1, 1, dtype="bfloat16") / rank_weights_file(0))
    for mode, options, ratio in [("int8_wo", {}, 0.5 + 4 / (2 * 64)),       # [out] scales, in = 64 or 128
                                 ("int4_wo", {"quant_group_size": 64}, 0.25 + 4 / (2 * 64)),
                                 ("fp8", {}, 0.5 + 4 / (2 * 64))]:
        sizes = _tensor_bytes(engines.get("llama", 1, 1, dtype="bfloat16", quant=mode, **options) / rank_weights_file(0))
        got = _linear_bytes(sizes) / _linear_bytes(bf16)
        assert 0.8 * ratio < got <= ratio, (mode, got)
        for name in ("embed.weight", "lm_head.weight", "norm.weight", "layers.0.input_norm.weight"):
            assert sizes[name] == bf16[name], name


def test_engine_json_records_quantization_and_a_bad_mode_is_refused_at_load(engines, tmp_path):
    engine = engines.get("llama", 2, 1, **quant_options("int4_wo", quant_lm_head=True))
    spec = json.loads((engine / "engine.json").read_text())
    assert {k: spec["build"][k] for k in ("quant", "quant_group_size", "quant_lm_head")} == \
        {"quant": "int4_wo", "quant_group_size": GROUP, "quant_lm_head": True}
    assert EngineSpec.read(engine).build.quant_config == QuantConfig("int4_wo", GROUP, True)
    dense = json.loads((engines.get("llama", 1, 1) / "engine.json").read_text())
    assert dense["build"]["quant"] is None

    bad = tmp_path / "engine"
    shutil.copytree(engine, bad)
    spec["build"]["quant"] = "int3_wo"
    (bad / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(EngineError, match="unknown quantization mode 'int3_wo'.*int8_wo, int4_wo, fp8.*Rebuild"):
        EngineSpec.read(bad)


def test_config_refuses_bad_quant_options():
    with pytest.raises(LayoutError, match="unknown quantization mode 'int8'; choose one of int8_wo, int4_wo, fp8"):
        BuildConfig(quant="int8")
    with pytest.raises(LayoutError, match="power of two >= 16"):
        BuildConfig(quant="int4_wo", quant_group_size=48)
    with pytest.raises(LayoutError, match="--quant-lm-head needs a --quant mode"):
        BuildConfig(quant_lm_head=True)


def test_int4_group_straddling_tp_shards_is_refused_with_the_fix(engines):
    from dist_infer.config import ModelConfig
    from dist_infer.engine.runtime import EngineSpec as Spec

    cfg: ModelConfig = Spec.read(engines.get("llama", 1, 1)).model  # hidden 64, q 64, MLP 128
    quant.check_quant_layout(cfg, 2, QuantConfig("int4_wo", 32))
    with pytest.raises(LayoutError) as exc:
        quant.check_quant_layout(cfg, 2, QuantConfig("int4_wo", 64))
    msg = str(exc.value)
    assert "layers.*.self_attn.o_proj (its input dim is split over tp=2: 64 / 2 = 32 per rank)" in msg
    assert "not a multiple of the group size 64" in msg and "down_proj" not in msg  # 128 / 2 = 64 is fine
    assert "--quant-group-size 32" in msg and "a tp of 1" in msg and "--quant int8_wo" in msg
    with pytest.raises(LayoutError, match=r"qkv_proj \(64 input features\) is not a multiple of the group size 128"):
        quant.check_quant_layout(cfg, 1, QuantConfig("int4_wo", 128))


# ---------------------------------------------------------------- through the CLI

def _clean_failure(proc, *words):
    assert proc.returncode == 2, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in proc.stderr, f"{w!r} not in stderr:\n{proc.stderr[-3000:]}"


def test_cli_refuses_bad_quant_before_writing(engines, tmp_path):
    ckpt = engines.checkpoint("llama", 2, 1)
    cases = [(["--quant", "int3"], ["unknown quantization mode 'int3'", "int8_wo, int4_wo, fp8"]),
             (["--quant", "int4_wo", "--quant-group-size", "64"],
              ["self_attn.o_proj", "64 / 2 = 32 per rank", "--quant-group-size 32"]),
             (["--quant", "int8_wo", "--quant-group-size", "64"], ["--quant-group-size applies to --quant int4_wo"])]
    for args, words in cases:
        out = tmp_path / "engine"
        proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), *args, timeout=TIMEOUT)
        _clean_failure(proc, *words)
        assert not out.exists() and not list(tmp_path.iterdir()), args  # no engine, no staging dir


def test_mpirun_build_equals_single_process_build(engines):
    """Each process quantizes its own rank; row-parallel scales read the TP peers' shards, so the
    files are byte for byte those of the one-process build."""
    one = engines.get("llama", 2, 2, quant="int8_wo")
    out = one.parent / "engine-int8-mpirun"
    proc = run_cli("build", "--checkpoint", str(engines.checkpoint("llama", 2, 2)), "--out", str(out),
                   "--quant", "int8_wo", world=4, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "engine.json").read_text())["files"] == \
        json.loads((one / "engine.json").read_text())["files"]


def test_cli_run_answers_with_a_quantized_engine(engines, tmp_path):
    engine = engines.get("llama", 1, 1, quant="int8_wo")
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    proc = run_cli("run", "--engine", str(engine), "--prompts-file", str(prompts), "--json", "--max-new-tokens", "4",
                   "--ignore-eos", timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    first = engine_logits(engine, PROMPTS)[torch.tensor([len(PROMPTS[0]) - 1, sum(map(len, PROMPTS)) - 1])]
    assert [o["output_ids"][0] for o in outs] == first.argmax(-1).tolist()


@pytest.mark.parametrize("mode", MODES)
def test_random_weight_engine_quantized(mode, tmp_path):
    """`build --random-weights PRESET --quant MODE` (benchmarks): quantized tensors whose
    dequantized values have the dense engines' std 0.02, loadable by the quantized model."""
    from dist_infer.engine.random_engine import build_random_engine

    build_cfg = BuildConfig(dtype="bfloat16", max_seq_len=64, **quant_options(mode))
    out = build_random_engine("tiny-llama", tmp_path / "e", 2, 1, build_cfg, with_tokenizer=False, device="cpu")
    weights = load_file(out / rank_weights_file(1))
    dequantize = {"int8_wo": quant.dequantize_int8, "int4_wo": quant.dequantize_int4, "fp8": quant.dequantize_fp8}[mode]
    params = ("qweight", "scales", "offsets")[:3 if mode == "int4_wo" else 2]
    w = dequantize(*(weights[f"layers.0.mlp.down_proj.{p}"] for p in params))
    assert 0.019 < w.std().item() < 0.021 and abs(w.mean().item()) < 0.002
    load_stage(out, 1, SimpleNamespace(rank=1, size=2))  # the file's tensors are exactly the model's


@pytest.mark.parametrize("mode,tp,needs_peers", [(None, 2, False), ("int4_wo", 2, False), ("int8_wo", 2, True),
                                                  ("fp8", 2, True), ("int8_wo", 1, False)])
def test_only_per_channel_row_parallel_builds_read_the_tp_peers_shards(mode, tp, needs_peers):
    """A dense or group-wise build reads its own shard alone, so ranks on node-local
    storage can build; per-channel scales of row-parallel weights need the whole rows."""
    from dist_infer.config import Mapping, ModelConfig
    from dist_infer.engine.build import _needs_row_absmax, stage_skeleton
    from dist_infer.presets import preset_hf_config

    cfg = ModelConfig.from_hf(preset_hf_config("tiny-llama"))
    quant_cfg = QuantConfig(mode=mode, group_size=GROUP)
    model = stage_skeleton(cfg, Mapping(tp=tp, pp=1, rank=0), 512, torch.float32, quant_cfg)
    assert _needs_row_absmax(model) is needs_peers
