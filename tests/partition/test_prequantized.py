"""Pre-quantized checkpoints through `partition` and `build` without dequantizing
(partition/prequantized.py): AutoAWQ GEMM and GPTQ INT4 -> int4_wo, FP8 compressed-tensors
and ModelOpt -> fp8.

Each test writes a tiny random Llama (or Qwen2) checkpoint in the format's exact on-disk
form: its key names, its quantization_config, and its packing, done here by packers written
from the formats' definitions (AutoAWQ's WQLinear_GEMM.from_linear, AutoGPTQ's
QuantLinear.pack), not by dist_infer. The reference is transformers' model with the
checkpoint's dequantized weights, in float32. Engines are partitioned and built in-process
and their TP ranks run as threads (tests/engine/test_quant.py's `engine_logits`).

Tolerances: INT4 engines hold the same codes, scales and zeros, so in float32 their logits
equal the reference's up to summation order (atol 2e-4 on logits of magnitude ~10). FP8
engines quantize each token's activations at run time; the reference does the same (a
pre-hook on each linear), so they agree to atol 2e-3 (measured: 3e-7 relative), except at
tp > 1 where a row-parallel layer's input is quantized per shard (engine/quant.py): there the
engine must be as close to the reference without activation rounding as tp=1 is, within 20 %
(measured: 1.11x per-channel, 0.97x per-tensor), as tests/engine/test_quant.py requires of
`--quant fp8`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY, TINY_COMMON, hf_classes, run_cli
from dist_infer.comm.base import LocalCommunicator
from dist_infer.config import BuildConfig
from dist_infer.engine import quant
from dist_infer.engine.build import build, rank_weights_file
from dist_infer.engine.runtime import EngineSpec
from dist_infer.errors import DistInferError
from dist_infer.partition import partition
from engine.test_quant import PROMPTS, engine_logits

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ: nibble i of column c holds output 8c + AWQ_ORDER[i]
INT4_ATOL, FP8_ATOL = 2e-4, 2e-3


# ---------------------------------------------------------------- tiny models and references

def tiny_model(arch: str = "llama", seed: int = 0, **overrides):
    """A random float32 HF model (tests/conftest.py's shapes and init), not saved."""
    config_cls, model_cls = hf_classes(arch)
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**TINY_COMMON, **TINY[arch], **overrides})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.15 if p.ndim > 1 else 0.3)
    return model


def is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.removesuffix(".weight").split(".", 3)[-1] in LINEARS


def reference_logits(model, weights: dict[str, torch.Tensor], fp8_activations: bool = False) -> torch.Tensor:
    """[tokens of PROMPTS, vocab] from the HF model holding `weights` (the dequantized checkpoint);
    fp8_activations: each decoder linear's input rounded to FP8 per token, as the fp8 engine does."""
    model.load_state_dict(weights, strict=False)
    hooks = []
    if fp8_activations:
        for name, module in model.named_modules():
            if is_linear(f"{name}.weight"):
                hooks.append(module.register_forward_pre_hook(lambda m, args: (_fp8_round(args[0]),)))
    with torch.no_grad():
        logits = torch.cat([model(torch.tensor([p])).logits[0] for p in PROMPTS])
    for h in hooks:
        h.remove()
    return logits


def _fp8_round(x: torch.Tensor) -> torch.Tensor:
    q, scales = quant.quantize_fp8_per_token(x.reshape(-1, x.shape[-1]))
    return quant.dequantize_fp8(q, scales).reshape(x.shape).to(x.dtype)


# ---------------------------------------------------------------- INT4: quantize and pack as AutoAWQ / AutoGPTQ do

def quantize_int4(w: torch.Tensor, group: int, sym: bool):
    """w [out, in] -> (codes [out, in], zeros [out, G] int64, scales [out, G] fp16), min/max per group
    (GPTQ's grid: the range always spans 0; sym: zero 8, scale = 2 absmax / 15)."""
    out, inp = w.shape
    g = inp if group == -1 else group
    x = w.reshape(out, inp // g, g)
    if sym:
        scales = (2 * x.abs().amax(-1) / 15).half()
        zeros = torch.full(scales.shape, 8)
    else:
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        scales = ((hi - lo) / 15).clamp(min=1e-5).half()
        zeros = torch.round(-lo / scales.float()).clamp(1, 15).long()  # >= 1: GPTQ v1 cannot store a zero of 0
    codes = torch.round(x / scales.float()[..., None] + zeros[..., None]).clamp(0, 15).long()
    return codes.reshape(out, inp), zeros, scales


def dequantize_int4(codes, zeros, scales) -> torch.Tensor:
    g = codes.shape[1] // zeros.shape[1]
    return ((codes - zeros.repeat_interleave(g, 1)) * scales.float().repeat_interleave(g, 1)).float()


def pack_int32(values: torch.Tensor, dim: int, order=tuple(range(8))) -> torch.Tensor:
    """Codes in [0, 15], 8 per int32 along `dim`: nibble i of element k holds index 8k + order[i]."""
    v = values.long().movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)[..., list(order)]
    packed = (v << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32)  # the bits of a uint32
    return packed.movedim(-1, dim)


def awq_tensors(codes, zeros, scales, **_) -> dict[str, torch.Tensor]:
    """AutoAWQ WQLinear_GEMM: qweight [in, out/8], qzeros [G, out/8] (interleaved), scales [G, out]."""
    return {"qweight": pack_int32(codes.T, 1, AWQ_ORDER), "qzeros": pack_int32(zeros.T, 1, AWQ_ORDER),
            "scales": scales.T.contiguous()}


def gptq_tensors(codes, zeros, scales, group: int, v2: bool = False, renumber: bool = False) -> dict[str, torch.Tensor]:
    """AutoGPTQ QuantLinear.pack: qweight [in/8, out] along the inputs, qzeros [G, out/8] storing
    zero - 1 (v1), scales [G, out], g_idx [in]. renumber: store the groups in reverse order (the
    row-contiguous case of act-order): group k of the row is stored at index G - 1 - k."""
    inp = codes.shape[1]
    blocks = torch.arange(inp) // (inp if group == -1 else group)
    zeros_t, scales_t = zeros.T, scales.T
    if renumber:
        group_order = torch.arange(zeros.shape[1]).flip(0)
        zeros_t, scales_t = torch.empty_like(zeros_t), torch.empty_like(scales_t)
        zeros_t[group_order], scales_t[group_order] = zeros.T, scales.T
        blocks = group_order[blocks]
    return {"qweight": pack_int32(codes.T, 0), "qzeros": pack_int32(zeros_t - (0 if v2 else 1), 1),
            "scales": scales_t.contiguous(), "g_idx": blocks.to(torch.int32)}


def awq_config(group: int) -> dict:
    return {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm",
            "modules_to_not_convert": None}


def gptq_config(group: int, sym: bool = False, desc_act: bool = False, fmt: str = "gptq", bits: int = 4) -> dict:
    return {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": desc_act, "sym": sym,
            "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": fmt}


# ---------------------------------------------------------------- FP8: compressed-tensors and ModelOpt

def fp8_tensors(w: torch.Tensor, per_channel: bool, ct_shape: bool = True) -> tuple[dict, torch.Tensor]:
    """(checkpoint tensors, dequantized w): weight e4m3 [out, in], weight_scale float32
    [out, 1] (compressed-tensors channel) / [] (ModelOpt per tensor), plus a static input_scale."""
    absmax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    scale = (absmax / 448).float()
    q = (w / scale).to(torch.float8_e4m3fn)
    tensors = {"weight": q, "weight_scale": scale if ct_shape or per_channel else scale.reshape(())}
    if not per_channel:
        tensors["input_scale"] = torch.tensor(0.05)  # a static activation scale: the engine uses its own
    return tensors, q.float() * scale


def compressed_tensors_config(strategy: str = "channel") -> dict:
    """llm-compressor's FP8_DYNAMIC scheme as saved in config.json."""
    args = {"num_bits": 8, "type": "float", "symmetric": True, "group_size": None, "block_structure": None,
            "actorder": None, "observer": "minmax", "observer_kwargs": {}}
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "output_activations": None,
                                          "weights": {**args, "strategy": strategy, "dynamic": False},
                                          "input_activations": {**args, "strategy": "token", "dynamic": True}}},
            "ignore": ["lm_head"], "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}}


MODELOPT_SIDE_FILE = {"producer": {"name": "modelopt", "version": "0.19.0"},
                      "quantization": {"quant_algo": "FP8", "kv_cache_quant_algo": None,
                                       "exclude_modules": ["lm_head"]}}


# ---------------------------------------------------------------- writing a checkpoint

def write_checkpoint(directory: Path, model, quantize_linear, config: dict | None,
                     side_files: dict | None = None, extra: dict | None = None) -> dict[str, torch.Tensor]:
    """Save `model` as a HF checkpoint whose decoder linears are `quantize_linear(w) -> (tensors,
    dequantized)` and the rest float16 (as AWQ/GPTQ exports are); returns the dequantized weights."""
    directory.mkdir(parents=True)
    tensors, dequantized = dict(extra or {}), {}
    for name, w in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        if is_linear(name):
            parts, dequantized[name] = quantize_linear(w)
            tensors.update({f"{name.removesuffix('.weight')}.{k}": v.contiguous() for k, v in parts.items()})
        else:
            tensors[name] = w.half()
            dequantized[name] = w.half().float()
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    hf_config = json.loads((directory / "config.json").read_text())
    if config is not None:
        hf_config["quantization_config"] = config
    (directory / "config.json").write_text(json.dumps(hf_config))
    for name, content in (side_files or {}).items():
        (directory / name).write_text(json.dumps(content))
    return dequantized


def int4_linear(pack, group: int, sym: bool = False, **pack_options):
    def quantize_linear(w):
        codes, zeros, scales = quantize_int4(w, group, sym)
        return pack(codes, zeros, scales, group=group, **pack_options), dequantize_int4(codes, zeros, scales)
    return quantize_linear


class Built:
    """Partition and build each (checkpoint, layout) once, in-process."""

    def __init__(self, root: Path):
        self.root, self.engines = root, {}

    def engine(self, source: Path, tp: int = 1, pp: int = 1) -> Path:
        key = (source, tp, pp)
        if key not in self.engines:
            ckpt = self.root / f"{source.name}-ckpt-tp{tp}pp{pp}"
            partition(source, tp, pp, ckpt, progress=False)
            self.engines[key] = self.root / f"{source.name}-engine-tp{tp}pp{pp}"
            build(ckpt, self.engines[key], BuildConfig(max_seq_len=64), LocalCommunicator())
        return self.engines[key]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    return Built(tmp_path_factory.mktemp("prequantized"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor, torch.Tensor]]:
    """name -> (checkpoint directory, reference logits, reference logits without FP8 activations)."""
    root = tmp_path_factory.mktemp("prequantized-sources")
    variants = {
        "awq-g32": ("llama", int4_linear(awq_tensors, 32), awq_config(32), None, {}),
        "awq-g64": ("llama", int4_linear(awq_tensors, 64), awq_config(64), None, {}),
        "gptq-g32": ("llama", int4_linear(gptq_tensors, 32), gptq_config(32), None, {}),
        # act-order with row-contiguous groups, stored renumbered (g_idx is not i // 32)
        "gptq-sym-renumbered": ("llama", int4_linear(gptq_tensors, 32, sym=True, renumber=True),
                                gptq_config(32, sym=True, desc_act=True), None, {}),
        "gptq-v2-per-channel-qwen2": ("qwen2", int4_linear(gptq_tensors, -1, v2=True), gptq_config(-1, fmt="gptq_v2"),
                                      None, {}),
        "fp8-compressed-tensors": ("llama", lambda w: fp8_tensors(w, per_channel=True), compressed_tensors_config(),
                                   None, {}),
        "fp8-modelopt": ("llama", lambda w: fp8_tensors(w, per_channel=False, ct_shape=False), None,
                         {"hf_quant_config.json": MODELOPT_SIDE_FILE},
                         {"model.layers.0.self_attn.k_proj.k_scale": torch.tensor(0.1)}),  # KV scales: ignored
    }
    out = {}
    for name, (arch, quantize_linear, config, side, extra) in variants.items():
        model = tiny_model(arch)
        weights = write_checkpoint(root / name, model, quantize_linear, config, side, extra)
        out[name] = (root / name, reference_logits(model, weights, fp8_activations=name.startswith("fp8")),
                     reference_logits(model, weights))
    return out


# ---------------------------------------------------------------- the engines answer like the dequantized model

INT4_CASES = [("awq-g32", 1, 1), ("awq-g32", 2, 1), ("awq-g32", 1, 2), ("awq-g64", 2, 1), ("gptq-g32", 1, 1),
              ("gptq-g32", 2, 1), ("gptq-sym-renumbered", 2, 1), ("gptq-v2-per-channel-qwen2", 1, 1),
              ("gptq-v2-per-channel-qwen2", 2, 1)]


@pytest.mark.parametrize("name,tp,pp", INT4_CASES, ids=[f"{n}-tp{t}pp{p}" for n, t, p in INT4_CASES])
def test_int4_checkpoint_engine_equals_dequantized_reference(built, sources, name, tp, pp):
    """AWQ and GPTQ (asymmetric; symmetric act-order with renumbered groups; per-channel GPTQ v2
    on Qwen2 with q/k/v bias, MQA and tied embeddings) at every layout: the logits of the model
    holding the dequantized checkpoint, and sharded logits equal unsharded. awq-g64 at tp=2 splits
    o_proj's groups of 64 between ranks (32 inputs each): exact too."""
    source, reference, _ = sources[name]
    logits = engine_logits(built.engine(source, tp, pp))
    torch.testing.assert_close(logits, reference, rtol=0, atol=INT4_ATOL)
    if (tp, pp) != (1, 1):
        torch.testing.assert_close(logits, engine_logits(built.engine(source)), rtol=1e-5, atol=1e-4)


FP8_CASES = [("fp8-compressed-tensors", 1, 1), ("fp8-compressed-tensors", 2, 1), ("fp8-modelopt", 1, 1),
             ("fp8-modelopt", 1, 2), ("fp8-modelopt", 2, 1)]


def _relative_error(logits: torch.Tensor, reference: torch.Tensor) -> float:
    return ((logits - reference).norm() / reference.norm()).item()


@pytest.mark.parametrize("name,tp,pp", FP8_CASES, ids=[f"{n}-tp{t}pp{p}" for n, t, p in FP8_CASES])
def test_fp8_checkpoint_engine_equals_dequantized_reference(built, sources, name, tp, pp):
    """Per-channel (compressed-tensors) and per-tensor (ModelOpt, with a static input_scale and a
    KV k_scale that are not used) FP8 weights; activations quantized per token on both sides."""
    source, reference, weights_only = sources[name]
    logits = engine_logits(built.engine(source, tp, pp))
    if tp == 1:
        torch.testing.assert_close(logits, reference, rtol=0, atol=FP8_ATOL)
    else:  # row-parallel inputs are quantized per shard: as far from exact activations as tp=1 is
        one = engine_logits(built.engine(source))
        assert _relative_error(logits, weights_only) < 1.2 * _relative_error(one, weights_only)


# ---------------------------------------------------------------- what the engine files hold

def _checkpoint_tensors(source: Path) -> dict[str, torch.Tensor]:
    return load_file(source / "model.safetensors")


def test_int4_engine_holds_the_checkpoints_codes_scales_and_zeros(built, sources):
    """No requantization: the engine's fused q/k/v codes are AWQ's (unpacked from its interleaved
    int32s), its scales are AWQ's fp16 scales, and offset = -zero * scale; tp=2 holds row slices."""
    source, *_ = sources["awq-g32"]
    raw = _checkpoint_tensors(source)
    for tp in (1, 2):
        for rank in range(tp):
            weights = load_file(built.engine(source, tp) / rank_weights_file(rank))
            qkv = "layers.1.self_attn.qkv_proj"
            codes = quant.unpack_int4(weights[f"{qkv}.qweight"])
            parts = [_awq_unpacked(raw, f"model.layers.1.self_attn.{p}_proj", rank, tp) for p in "qkv"]
            assert torch.equal(codes, torch.cat([c for c, _, _ in parts]))
            assert torch.equal(weights[f"{qkv}.scales"], torch.cat([s for _, _, s in parts]))
            assert torch.equal(weights[f"{qkv}.offsets"], torch.cat([-z * s for _, z, s in parts]))


def _awq_unpacked(raw: dict, prefix: str, rank: int, tp: int):
    """(codes [out, in], zeros, scales [out, G]) of a k/q/v projection's rows on `rank`, decoded
    here from the AWQ layout (llama: q 64 rows split over tp, k/v 16 rows = 2 KV heads split)."""
    def unpack(packed):  # [rows, out/8] interleaved -> [rows, out]
        nibbles = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], -1)  # [rows, out/8, nibble]
        return nibbles[..., [AWQ_ORDER.index(j) for j in range(8)]].reshape(packed.shape[0], -1)
    codes, zeros = unpack(raw[f"{prefix}.qweight"]).T, unpack(raw[f"{prefix}.qzeros"]).T.float()
    scales = raw[f"{prefix}.scales"].float().T
    rows = codes.shape[0] // tp
    pick = slice(rank * rows, (rank + 1) * rows)
    return codes[pick].to(torch.uint8), zeros[pick], scales[pick]


def test_fp8_engine_holds_the_checkpoints_bytes_and_scales(built, sources):
    """The e4m3 bytes are copied, not requantized; a per-tensor scale becomes each row's scale."""
    source, *_ = sources["fp8-modelopt"]
    raw = _checkpoint_tensors(source)
    weights = load_file(built.engine(source, 2) / rank_weights_file(1))
    down = "model.layers.2.mlp.down_proj"  # row-parallel: rank 1 holds input columns 64..127
    want = raw[f"{down}.weight"][:, 64:].contiguous()
    assert torch.equal(weights["layers.2.mlp.down_proj.qweight"].view(torch.uint8), want.view(torch.uint8))
    assert torch.equal(weights["layers.2.mlp.down_proj.scales"], raw[f"{down}.weight_scale"].expand(64))


def _linear_bytes(path: Path) -> int:
    weights = load_file(path)
    return sum(t.nbytes for n, t in weights.items() if n.startswith("layers.") and "_proj." in n
               and not n.endswith("bias"))


def test_engine_files_keep_the_quantized_size(built, sources):
    """Linear layers' bytes are the quantized ones (nothing dequantized on the way): INT4 half a byte
    per weight + a float32 scale and offset per group of 32; FP8 one byte per weight + a float32
    scale per row. The partitioned checkpoint holds them packed too."""
    weights = 4 * (2 * 64 * 64 + 2 * 16 * 64 + 3 * 128 * 64)  # 4 layers x (q, o; k, v; gate, up, down)
    rows = 4 * (64 + 16 + 16 + 64 + 128 + 128 + 64)
    awq = built.engine(sources["awq-g32"][0])
    assert _linear_bytes(awq / rank_weights_file(0)) == weights // 2 + 2 * 4 * weights // 32
    fp8 = built.engine(sources["fp8-compressed-tensors"][0])
    assert _linear_bytes(fp8 / rank_weights_file(0)) == weights + 4 * rows
    ckpt = load_file(awq.parent / "awq-g32-ckpt-tp1pp1" / "rank0.safetensors")
    assert ckpt["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    assert not any(n.endswith(("down_proj.weight", "qzeros", "g_idx")) for n in ckpt)


def test_engine_json_records_the_mode_and_loading_checks_it(built, sources):
    engine = built.engine(sources["gptq-g32"][0], 2)
    spec = json.loads((engine / "engine.json").read_text())
    assert (spec["build"]["quant"], spec["build"]["quant_group_size"]) == ("int4_wo", 32)
    assert spec["prequantized_checkpoint"] == {"mode": "int4_wo", "format": "gptq", "group_size": 32,
                                               "checkpoint_group_size": 32}
    assert EngineSpec.read(engine).build.quant_config.mode == "int4_wo"
    fp8 = json.loads((built.engine(sources["fp8-modelopt"][0]) / "engine.json").read_text())
    assert fp8["build"]["quant"] == "fp8" and fp8["prequantized_checkpoint"]["format"] == "modelopt"
    # Loading checks the mode: an engine.json claiming another mode no longer matches its weights.
    from engine.test_quant import load_stage

    spec["build"]["quant"] = "int8_wo"
    bad = engine.parent / "gptq-mislabeled"
    shutil.copytree(engine, bad)
    (bad / "engine.json").write_text(json.dumps(spec))
    with pytest.raises(DistInferError, match="do not match the model"):
        load_stage(bad, 0, LocalCommunicator())


def test_awq_groups_split_between_tp_ranks_keep_their_scales(built, sources):
    """awq-g64 at tp=2: o_proj's 64 inputs per row are one group split 32/32; the engine's groups
    of 32 each carry that group's scale and zero."""
    spec = json.loads((built.engine(sources["awq-g64"][0], 2) / "engine.json").read_text())
    assert spec["build"]["quant_group_size"] == 32
    assert {k: spec["prequantized_checkpoint"][k] for k in ("group_size", "checkpoint_group_size")} == \
        {"group_size": 32, "checkpoint_group_size": 64}
    one = json.loads((built.engine(sources["awq-g64"][0], 1) / "engine.json").read_text())
    assert one["build"]["quant_group_size"] == 64


# ---------------------------------------------------------------- refusals, before anything is written

def _variant(sources, tmp_path: Path, base: str, config_edit=None, tensors_edit=None) -> Path:
    """A copy of checkpoint `base` with its quantization_config or tensors changed."""
    copy = tmp_path / f"{base}-variant"
    shutil.copytree(sources[base][0], copy)
    if config_edit:
        config = json.loads((copy / "config.json").read_text())
        config_edit(config.setdefault("quantization_config", {}))
        (copy / "config.json").write_text(json.dumps(config))
    if tensors_edit:
        tensors = _checkpoint_tensors(copy)
        tensors_edit(tensors)
        save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


def _scatter_g_idx(tensors):
    """True act-order: each input's group drawn from a permutation, so groups are not runs."""
    g_idx = tensors["model.layers.1.mlp.up_proj.g_idx"]
    order = torch.randperm(len(g_idx), generator=torch.Generator().manual_seed(0))
    tensors["model.layers.1.mlp.up_proj.g_idx"] = g_idx[order]


def _dequantize_k_proj(tensors):
    """k_proj left unquantized while q/v are not: the engine fuses q/k/v into one weight."""
    prefix = "model.layers.2.self_attn.k_proj"
    weight, scale = tensors.pop(f"{prefix}.weight"), tensors.pop(f"{prefix}.weight_scale")
    tensors[f"{prefix}.weight"] = (weight.float() * scale).half()


REFUSALS = [
    ("gptq-g32", lambda c: c.update(bits=3), None, 1, ["4-bit codes only", "bits=4"]),
    ("gptq-g32", lambda c: c.update(quant_method="bitsandbytes"), None, 1,
     ["'bitsandbytes' is not supported", "awq", "gptq", "compressed-tensors (FP8)", "--quant"]),
    ("awq-g32", lambda c: c.update(version="gemv"), None, 1, ["version 'gemv'", "GEMM"]),
    ("gptq-g32", lambda c: c.update(desc_act=True), _scatter_g_idx, 1,
     ["model.layers.1.mlp.up_proj", "act-order", "desc_act=False", "static_groups=True"]),
    ("gptq-g32", lambda c: c.update(checkpoint_format="marlin"), None, 1, ["'marlin'", "'gptq'"]),
    ("fp8-compressed-tensors", lambda c: c["config_groups"]["group_0"]["weights"].update(
        strategy="block", block_structure=[128, 128]), None, 1, ["block-wise FP8", "one scale per output channel"]),
    ("fp8-compressed-tensors", lambda c: c.update(format="pack-quantized"), None, 1, ["'pack-quantized'"]),
    ("fp8-compressed-tensors", None, lambda t: t.update({"lm_head.weight": t["lm_head.weight"].to(torch.float8_e4m3fn),
                                                         "lm_head.weight_scale": torch.tensor([1.0])}), 1,
     ["lm_head is quantized", "unquantized head"]),
    ("fp8-compressed-tensors", None, _dequantize_k_proj, 1, ["layer 2", "self_attn.q_proj, self_attn.v_proj quantized",
                                                            "fuses"]),
]


@pytest.mark.parametrize("base,config_edit,tensors_edit,tp,words", REFUSALS,
                         ids=["bits3", "unknown-method", "awq-gemv", "act-order", "gptq-marlin", "fp8-block",
                              "ct-int4", "quantized-lm-head", "half-quantized-qkv"])
def test_unsupported_checkpoints_are_refused_before_writing(sources, tmp_path, base, config_edit, tensors_edit, tp,
                                                            words):
    source = _variant(sources, tmp_path, base, config_edit, tensors_edit)
    out = tmp_path / "ckpt"
    with pytest.raises(DistInferError) as exc:
        partition(source, tp, 1, out, progress=False)
    assert exc.value.exit_code == 2
    for w in words:
        assert w in str(exc.value), (w, str(exc.value))
    assert not out.exists() and not list(tmp_path.glob(".ckpt*"))


def test_a_group_cut_below_16_inputs_per_rank_is_refused_with_the_tps_that_work(tmp_path):
    """GPTQ groups of 32 on an MLP of 96: at tp=4 down_proj has 24 inputs per rank, so a rank
    would hold 24 (or 8) inputs of a group: no power-of-two group >= 16 fits. tp 1 and 2 work."""
    model = tiny_model("llama", intermediate_size=96)
    source = tmp_path / "gptq-mlp96"
    write_checkpoint(source, model, int4_linear(gptq_tensors, 32), gptq_config(32))
    with pytest.raises(DistInferError) as exc:
        partition(source, 4, 1, tmp_path / "ckpt", progress=False)
    msg = str(exc.value)
    assert exc.value.exit_code == 2 and "tp=4" in msg and "mlp.down_proj (24 inputs per rank)" in msg
    assert "--tp 1 or --tp 2" in msg and "group_size" in msg and not (tmp_path / "ckpt").exists()


def test_build_refuses_a_conflicting_quant_mode(built, sources, tmp_path):
    """`--quant` may only repeat a pre-quantized checkpoint's mode (exit code 2, through the CLI)."""
    ckpt = built.engine(sources["awq-g32"][0]).parent / "awq-g32-ckpt-tp1pp1"
    out = tmp_path / "engine"
    proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), "--quant", "int8_wo", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in ("--quant int8_wo conflicts with the checkpoint", "pre-quantized (awq)", "--quant int4_wo"):
        assert w in proc.stderr, proc.stderr[-3000:]
    assert not out.exists()
    with pytest.raises(DistInferError, match="--quant-group-size 64 conflicts .* groups of 32"):
        build(ckpt, out, BuildConfig(quant="int4_wo", quant_group_size=64), LocalCommunicator())
    build(ckpt, out, BuildConfig(quant="int4_wo"), LocalCommunicator())  # repeating the mode is fine
    assert json.loads((out / "engine.json").read_text())["build"]["quant_group_size"] == 32


def test_linears_a_checkpoint_left_unquantized_are_quantized_by_the_build(sources, tmp_path):
    """An FP8 checkpoint whose ignore list kept one down_proj in bf16: the build quantizes that
    layer itself (at tp=2 with the whole rows' scales, read from the peer's shard) and imports
    the others as they are."""
    prefix = "model.layers.3.mlp.down_proj"
    dense = {}

    def keep_dense(tensors):
        weight, scale = tensors.pop(f"{prefix}.weight"), tensors.pop(f"{prefix}.weight_scale")
        dense["w"] = tensors[f"{prefix}.weight"] = (weight.float() * scale).to(torch.bfloat16)

    source = _variant(sources, tmp_path, "fp8-compressed-tensors",
                      lambda c: c["ignore"].append(prefix), keep_dense)
    partition(source, 2, 1, tmp_path / "ckpt", progress=False)
    build(tmp_path / "ckpt", tmp_path / "engine", BuildConfig(max_seq_len=64), LocalCommunicator())
    q, scales = quant.quantize_fp8(dense["w"].float())
    weights = load_file(tmp_path / "engine" / rank_weights_file(1))
    assert torch.equal(weights["layers.3.mlp.down_proj.scales"], scales)
    assert torch.equal(weights["layers.3.mlp.down_proj.qweight"].view(torch.uint8),
                       q[:, 64:].contiguous().view(torch.uint8))
    raw = _checkpoint_tensors(source)["model.layers.2.mlp.down_proj.weight"]
    assert torch.equal(weights["layers.2.mlp.down_proj.qweight"].view(torch.uint8),
                       raw[:, 64:].contiguous().view(torch.uint8))


def test_quantization_config_is_read_where_each_exporter_writes_it(tmp_path):
    """config.json's quantization_config (transformers, llm-compressor, AutoAWQ, newer ModelOpt),
    AutoGPTQ's quantize_config.json, ModelOpt's hf_quant_config.json; none: unquantized."""
    from dist_infer.partition.prequantized import Fp8Format, Int4Format, parse_format, read_quantization_config

    cases = {"config": ({"quantization_config": awq_config(128)}, {}, Int4Format("awq", 128, 0)),
             "autogptq": ({}, {"quantize_config.json": {"bits": 4, "group_size": 64, "desc_act": False}},
                          Int4Format("gptq", 64, 1)),
             "modelopt-side": ({}, {"hf_quant_config.json": MODELOPT_SIDE_FILE}, Fp8Format("modelopt")),
             "modelopt-inline": ({"quantization_config": {"quant_method": "modelopt", "quant_algo":
                                                          "FP8_PER_CHANNEL_PER_TOKEN"}}, {}, Fp8Format("modelopt"))}
    for name, (config, side_files, want) in cases.items():
        directory = tmp_path / name
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps({"model_type": "llama", **config}))
        for file, content in side_files.items():
            (directory / file).write_text(json.dumps(content))
        assert parse_format(read_quantization_config(directory)) == want, name
    (tmp_path / "dense").mkdir()
    (tmp_path / "dense" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert read_quantization_config(tmp_path / "dense") is None
