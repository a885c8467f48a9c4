"""Pre-quantized Hugging Face checkpoints, imported into the engine's quantized layout.

`dist-infer partition` reads a checkpoint's `quantization_config` (config.json, or the
side files older exporters write: AutoGPTQ's quantize_config.json, ModelOpt's
hf_quant_config.json) and repacks each quantized linear layer into the form a
`--quant` build produces (engine/quant.py), without ever dequantizing it:

AutoAWQ, version "gemm" (quant_method "awq", bits 4, zero_point true)
    qweight int32 [in, out/8]    8 codes per int32 along the outputs, nibble i holding
                                 output 8c + AWQ_ORDER[i] (AutoAWQ interleaves them)
    qzeros  int32 [in/g, out/8]  zero points, packed the same way
    scales  fp16  [in/g, out]    w[o, i] = (code - zero) * scale, group i // g
GPTQ (AutoGPTQ, GPTQModel, optimum; quant_method "gptq", bits 4)
    qweight int32 [in/8, out]    8 codes per int32 along the inputs, nibble i holding input 8r + i
    qzeros  int32 [G, out/8]     along the outputs, in natural order; checkpoint_format "gptq"
                                 (v1, the default) stores zero - 1, "gptq_v2" the zero itself
    scales  fp16  [G, out]
    g_idx   int32 [in]           the group of each input (act-order: see `_gptq_block_groups`)
FP8 e4m3, compressed-tensors (llm-compressor FP8 / FP8_DYNAMIC) or ModelOpt (FP8,
FP8_PER_CHANNEL_PER_TOKEN)
    weight       float8_e4m3fn [out, in]
    weight_scale float32/bf16 [] or [1] (per tensor), [out, 1] or [out] (per channel); w = q * scale
    input_scale  a static activation scale: not used, the engine quantizes each token's
                 activations with their own scale at run time (at least as accurate)

Engine form (engine/quant.py): int4_wo keeps the 4-bit codes, two per byte along the inputs
(uint8 [out, in/2]), with a scale and an offset per group ([out, in/group]); the offset is the
value of code 0, so an AWQ/GPTQ zero point becomes offset = -zero * scale, exact in float32.
fp8 keeps the e4m3 bytes as they are, with one float32 scale per output row (a per-tensor
scale repeated), so q/k/v and gate/up, each with its own scale, fuse by concatenation.

The engine has one group size for every layer; it is the source's, or a power-of-two divisor
of it when TP splits a row-parallel layer's inputs inside a group (each half keeps the group's
scale and zero, so the split is exact), or when the checkpoint has one group per row
(group_size -1: the row's scale repeats over groups that divide every layer's inputs).

`wrap` hands the partitioner a view of the checkpoint in which each quantized linear `X`
shows the engine's `X.qweight`, `X.scales` (and `X.offsets`) instead of its raw tensors; the
sharding rules split those like any weight, and `dist-infer build` concatenates q/k/v and
gate/up as they are. Peak memory: one linear layer unpacked (one byte per weight).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from math import gcd
from pathlib import Path

import torch

from dist_infer.config import ModelConfig, valid_tp_sizes
from dist_infer.engine.quant import linear_inputs, pack_int4
from dist_infer.errors import CheckpointError, LayoutError
from dist_infer.models import family_of
from dist_infer.partition.sources import SourceCheckpoint, TensorMeta

log = logging.getLogger(__name__)

SUPPORTED = ("awq (AutoAWQ GEMM, 4-bit)", "gptq (4-bit)", "compressed-tensors (FP8)", "modelopt (FP8)")
UNQUANTIZED_FIX = ("Any model also works from an unquantized copy: load it with the library that wrote it, save "
                   "it unquantized (`save_pretrained`), partition that, and quantize in the build "
                   "(`dist-infer build --quant int4_wo`, `int8_wo` or `fp8`).")
MIN_ENGINE_GROUP = 16  # QuantConfig's smallest group size
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # output 8c + AWQ_ORDER[i] sits in nibble i of column c
AWQ_NIBBLE_OF_OUTPUT = tuple(AWQ_ORDER.index(j) for j in range(8))  # (0, 4, 1, 5, 2, 6, 3, 7)
NIBBLE_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)  # nibble i of an int32 is bits 4i..4i+3

# Static activation and KV-cache scales some FP8 exports carry: the engine computes its own.
_RUNTIME_SCALES = re.compile(r"\.(input_scale|k_scale|v_scale|q_scale)$")


@dataclass(frozen=True)
class QuantLinear:
    """One quantized linear layer of the checkpoint: its HF module name and full shape."""

    prefix: str
    out_features: int
    in_features: int
    file: Path


# ---------------------------------------------------------------- reading the quantization config

def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, OSError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); restore it from the model's download.") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object; restore it from the model's download.")
    return data


def read_quantization_config(directory: Path) -> dict | None:
    """The checkpoint's quantization config: config.json's `quantization_config`, else
    AutoGPTQ's quantize_config.json, else ModelOpt's hf_quant_config.json; None if unquantized."""
    config = _read_json(directory / "config.json").get("quantization_config")
    if isinstance(config, dict):
        return config
    if (directory / "quantize_config.json").is_file():
        return {"quant_method": "gptq", **_read_json(directory / "quantize_config.json")}
    if (directory / "hf_quant_config.json").is_file():
        return {"quant_method": "modelopt", **_read_json(directory / "hf_quant_config.json")}
    return None


def _refuse(config: dict, problem: str, fix: str) -> None:
    raise CheckpointError(f"this checkpoint's quantization_config ({config.get('quant_method')}) {problem}. {fix}")


def parse_format(config: dict) -> Int4Format | Fp8Format:
    """The checkpoint's format, or a clear refusal of one dist_infer cannot import exactly."""
    method = str(config.get("quant_method", "")).lower()
    method = "modelopt" if method.startswith("modelopt") else method
    parsers = {"awq": _awq_format, "gptq": _gptq_format, "compressed-tensors": _compressed_tensors_format,
               "modelopt": _modelopt_format}
    if method not in parsers:
        raise CheckpointError(f"quantization method {config.get('quant_method')!r} is not supported; "
                              f"`dist-infer partition` imports {', '.join(SUPPORTED)}. {UNQUANTIZED_FIX}")
    return parsers[method](config)


def _check_bits(config: dict, bits) -> None:
    if bits != 4:
        _refuse(config, f"has {bits}-bit weights; dist_infer's INT4 layout holds 4-bit codes only",
                "Use a 4-bit (bits=4) checkpoint of the model. " + UNQUANTIZED_FIX)


def _check_group_size(config: dict, group) -> int:
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        _refuse(config, f"has group_size {group!r}", "It must be a positive integer or -1 (one group per row); "
                "restore config.json from the model's download.")
    return group


def _awq_format(config: dict) -> Int4Format:
    _check_bits(config, config.get("bits", config.get("w_bit")))
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        _refuse(config, f"is AutoAWQ version {version!r}, whose packing differs from 'gemm'",
                "Quantize with AutoAWQ's default `\"version\": \"GEMM\"`. " + UNQUANTIZED_FIX)
    if not config.get("zero_point", True):
        _refuse(config, "has zero_point false, which AutoAWQ's GEMM format never writes",
                "Restore config.json from the model's download.")
    return Int4Format("awq", _check_group_size(config, config.get("group_size", config.get("q_group_size"))), 0)


GPTQ_ZERO_BIAS = {"gptq": 1, "gptq_v2": 0}  # v1 stores zero - 1 (AutoGPTQ's convention)


def _gptq_format(config: dict) -> Int4Format:
    _check_bits(config, config.get("bits"))
    layout = str(config.get("checkpoint_format", config.get("format", "gptq"))).lower()
    if layout not in GPTQ_ZERO_BIAS:
        _refuse(config, f"has checkpoint_format {layout!r}, a kernel-specific repacking",
                "Use a checkpoint saved in the portable 'gptq' (or 'gptq_v2') format. " + UNQUANTIZED_FIX)
    return Int4Format("gptq", _check_group_size(config, config.get("group_size")), GPTQ_ZERO_BIAS[layout])


FP8_CT_FORMATS = ("float-quantized", "naive-quantized")


def _compressed_tensors_format(config: dict) -> Fp8Format:
    if config.get("format") not in FP8_CT_FORMATS:
        _refuse(config, f"stores weights as {config.get('format')!r}; dist_infer imports compressed-tensors "
                f"FP8 checkpoints ({' or '.join(FP8_CT_FORMATS)}) only", UNQUANTIZED_FIX)
    groups = config.get("config_groups") or {}
    if not groups:
        _refuse(config, "has no config_groups", "Restore config.json from the model's download.")
    for name, group in groups.items():
        _check_ct_weights(config, name, (group or {}).get("weights") or {})
    return Fp8Format("compressed-tensors")


def _check_ct_weights(config: dict, group: str, weights: dict) -> None:
    """FP8 e4m3, symmetric, one scale per tensor or per output channel."""
    if weights.get("type") != "float" or weights.get("num_bits") != 8:
        _refuse(config, f"group {group} quantizes weights to {weights.get('type')} {weights.get('num_bits')}-bit; "
                "dist_infer imports compressed-tensors FP8 (type float, 8 bits) only", UNQUANTIZED_FIX)
    if weights.get("strategy") not in ("tensor", "channel") or weights.get("block_structure"):
        _refuse(config, f"group {group} has {weights.get('strategy')}-wise FP8 weight scales; the engine's FP8 "
                "layout has one scale per output channel (per-tensor and per-channel checkpoints import)",
                UNQUANTIZED_FIX)
    if weights.get("symmetric") is False:
        _refuse(config, f"group {group} has asymmetric FP8 weights", UNQUANTIZED_FIX)


MODELOPT_FP8_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN")


def _modelopt_format(config: dict) -> Fp8Format:
    section = config.get("quantization") if isinstance(config.get("quantization"), dict) else config
    algo = str(section.get("quant_algo", "")).upper()
    if algo not in MODELOPT_FP8_ALGOS:
        _refuse(config, f"is ModelOpt quant_algo {algo!r}; dist_infer imports ModelOpt "
                f"{' and '.join(MODELOPT_FP8_ALGOS)}", UNQUANTIZED_FIX)
    return Fp8Format("modelopt")


# ---------------------------------------------------------------- INT4: AWQ and GPTQ

def unpack_nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 [..] -> uint8 codes with `dim` 8x longer: nibble i of element k becomes index 8k + i."""
    nibbles = (packed.unsqueeze(dim + 1) >> NIBBLE_SHIFTS.view([8] + [1] * (packed.ndim - dim - 1))) & 0xF
    shape = list(packed.shape)
    shape[dim] *= 8
    return nibbles.reshape(shape).to(torch.uint8)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 [rows, out/8] (interleaved) -> uint8 [rows, out] in output order."""
    nibbles = unpack_nibbles(packed, 1).view(packed.shape[0], -1, 8)  # [rows, out/8, nibble]
    return nibbles[:, :, list(AWQ_NIBBLE_OF_OUTPUT)].reshape(packed.shape[0], -1)


@dataclass(frozen=True)
class Int4Format:
    """AutoAWQ GEMM or GPTQ 4-bit weights -> int4_wo."""

    name: str          # "awq" | "gptq"
    group_size: int    # inputs per group in the checkpoint; -1: one group per row
    zero_bias: int     # added to stored zero points (GPTQ v1 stores zero - 1)
    mode = "int4_wo"

    def raw_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.{p}" for p in ("qweight", "qzeros", "scales", "g_idx")]

    def linears(self, tensors: dict[str, TensorMeta]) -> dict[str, QuantLinear]:
        return {n.removesuffix(".qweight"): self._linear(n.removesuffix(".qweight"), tensors)
                for n in tensors if n.endswith(".qweight")}

    def _linear(self, prefix: str, tensors: dict[str, TensorMeta]) -> QuantLinear:
        """Shape from qweight (AWQ [in, out/8], GPTQ [in/8, out]), checked against qzeros and scales."""
        qweight = tensors[f"{prefix}.qweight"]
        if qweight.dtype != "I32" or len(qweight.shape) != 2:
            raise CheckpointError(f"{prefix}.qweight is {qweight.dtype} {list(qweight.shape)}, not 2-D int32 as "
                                  f"{self.name} packs it; it does not match its quantization_config.")
        rows, cols = qweight.shape
        out_features, in_features = (cols * 8, rows) if self.name == "awq" else (cols, rows * 8)
        group = in_features if self.group_size == -1 else self.group_size
        if in_features % group:
            raise CheckpointError(f"{prefix}: {in_features} inputs are not a whole number of groups of {group}; "
                                  "dist_infer's INT4 layout needs whole groups. " + UNQUANTIZED_FIX)
        want = {"qzeros": ("I32", (in_features // group, out_features // 8)),
                "scales": (None, (in_features // group, out_features))}
        if f"{prefix}.g_idx" in tensors:
            want["g_idx"] = (None, (in_features,))
        for part, (dtype, shape) in want.items():
            _check_tensor(tensors, f"{prefix}.{part}", dtype, shape)
        return QuantLinear(prefix, out_features, in_features, qweight.file)

    def virtual_tensors(self, linear: QuantLinear, group: int) -> dict[str, TensorMeta]:
        out, inp, file = linear.out_features, linear.in_features, linear.file
        return {f"{linear.prefix}.qweight": TensorMeta(file, "U8", (out, inp // 2)),
                f"{linear.prefix}.scales": TensorMeta(file, "F32", (out, inp // group)),
                f"{linear.prefix}.offsets": TensorMeta(file, "F32", (out, inp // group))}

    def convert(self, source: SourceCheckpoint, linear: QuantLinear, group: int) -> dict[str, torch.Tensor]:
        """The engine's (qweight uint8 [out, in/2], scales, offsets float32 [out, in/group])."""
        p = linear.prefix
        codes = self._codes(source.read(f"{p}.qweight"))                                  # [out, in]
        zeros, scales = self._zeros(source.read(f"{p}.qzeros")), source.read(f"{p}.scales").float().T  # [out, G]
        if f"{p}.g_idx" in source.tensors:
            blocks = _gptq_block_groups(source.read(f"{p}.g_idx"), self._group(linear), linear)
            zeros, scales = zeros[:, blocks], scales[:, blocks]
        repeat = self._group(linear) // group  # engine groups per checkpoint group
        scales, zeros = scales.repeat_interleave(repeat, 1), zeros.repeat_interleave(repeat, 1)
        return {"qweight": pack_int4(codes), "scales": scales, "offsets": -zeros * scales}

    def check_act_order(self, source: SourceCheckpoint, linears: dict[str, QuantLinear]) -> None:
        """Refuse scattered act-order groups before anything is written (g_idx is small: [in] ints)."""
        for linear in linears.values():
            if f"{linear.prefix}.g_idx" in source.tensors:
                _gptq_block_groups(source.read(f"{linear.prefix}.g_idx"), self._group(linear), linear)

    def _group(self, linear: QuantLinear) -> int:
        return linear.in_features if self.group_size == -1 else self.group_size

    def _codes(self, qweight: torch.Tensor) -> torch.Tensor:
        """-> uint8 [out, in]."""
        return unpack_awq(qweight).T.contiguous() if self.name == "awq" else unpack_nibbles(qweight, 0).T.contiguous()

    def _zeros(self, qzeros: torch.Tensor) -> torch.Tensor:
        """-> float32 [out, G] zero points (a GPTQ v1 zero stored as 15 is read as 16, as its loaders do)."""
        codes = unpack_awq(qzeros) if self.name == "awq" else unpack_nibbles(qzeros, 1)
        return (codes.float() + self.zero_bias).T


def _gptq_block_groups(g_idx: torch.Tensor, group: int, linear: QuantLinear) -> torch.Tensor:
    """The checkpoint group of each run of `group` consecutive inputs: [in/group].

    Without act-order g_idx is i // group. With act-order (desc_act) GPTQ quantized the inputs
    in another order: a checkpoint whose every group is still a contiguous run (static_groups,
    or groups merely renumbered) imports exactly by re-indexing scales and zeros; one whose
    groups are scattered over the inputs would need its activations permuted at run time."""
    blocks = g_idx.long().view(-1, group)  # [in/group, group]
    if not (blocks == blocks[:, :1]).all():
        raise CheckpointError(
            f"{linear.prefix}: GPTQ act-order (desc_act=true) scattered each group's inputs over the row "
            "(g_idx is not constant on runs of group_size inputs), which a contiguous-group INT4 layout can only "
            "follow by permuting activations at run time; dist_infer does not. Use a checkpoint quantized with "
            "desc_act=False, or with static_groups=True (GPTQModel / AutoGPTQ quantize configs). " + UNQUANTIZED_FIX)
    return blocks[:, 0]


def _check_tensor(tensors: dict[str, TensorMeta], name: str, dtype: str | None, shape) -> None:
    meta = tensors.get(name)
    if meta is None:
        raise CheckpointError(f"{name} is missing; the checkpoint is incomplete (re-download it).")
    if (dtype and meta.dtype != dtype) or (shape and tuple(meta.shape) != tuple(shape)):
        raise CheckpointError(f"{name} is {meta.dtype} {list(meta.shape)}, expected {dtype or 'float'} "
                              f"{list(shape) if shape else ''}; it does not match its quantization_config.")


def _power_of_two_part(n: int) -> int:
    return n & -n


def _describe_groups(fmt: Int4Format) -> str:
    return "one group per row" if fmt.group_size == -1 else f"groups of {fmt.group_size} inputs"


def engine_group_size(fmt: Int4Format, model: ModelConfig, tp: int) -> int:
    """The largest power of two dividing the checkpoint's group and every layer's per-rank
    inputs: each engine group then lies inside one checkpoint group and one TP shard."""
    sizes = [per_rank for _, per_rank, _ in linear_inputs(model, tp, lm_head=False)]
    return _power_of_two_part(gcd(*sizes, *([fmt.group_size] if fmt.group_size != -1 else [])))


def check_int4_layout(fmt: Int4Format, model: ModelConfig, tp: int) -> int:
    """The engine group size, or a refusal naming the layers whose TP split cuts a group."""
    group = engine_group_size(fmt, model, tp)
    if group >= MIN_ENGINE_GROUP:
        if fmt.group_size not in (-1, group):
            log.warning("tp=%d splits %s groups of %d inputs between ranks: the engine keeps groups of %d (each "
                        "with its checkpoint group's scale and zero, exact) and %dx the scale bytes", tp, fmt.name,
                        fmt.group_size, group, fmt.group_size // group)
        return group
    source_group = fmt.group_size if fmt.group_size != -1 else 0  # gcd(n, 0) == n
    cut = [f"{name} ({per_rank} inputs per rank)" for name, per_rank, _ in linear_inputs(model, tp, False)
           if _power_of_two_part(gcd(per_rank, source_group)) < MIN_ENGINE_GROUP]
    tps = [t for t in valid_tp_sizes(model) if engine_group_size(fmt, model, t) >= MIN_ENGINE_GROUP]
    raise LayoutError(f"this {fmt.name} checkpoint ({_describe_groups(fmt)}) cannot be sharded at tp={tp}: "
                      f"{'; '.join(cut)}: a rank's share of a group would not be a multiple of {MIN_ENGINE_GROUP} "
                      "inputs, the smallest INT4 group the engine holds. Partition with "
                      + (f"--tp {' or --tp '.join(map(str, tps))}" if tps else "another --tp")
                      + ", or use a checkpoint quantized with a group_size that divides every layer's inputs per rank.")


# ---------------------------------------------------------------- FP8

@dataclass(frozen=True)
class Fp8Format:
    """FP8 e4m3 weights with a per-tensor or per-channel `weight_scale` -> fp8."""

    name: str  # "compressed-tensors" | "modelopt"
    mode = "fp8"
    group_size = None

    def raw_names(self, prefix: str) -> list[str]:
        return [f"{prefix}.weight", f"{prefix}.weight_scale"]

    def linears(self, tensors: dict[str, TensorMeta]) -> dict[str, QuantLinear]:
        found = {}
        for name, meta in tensors.items():
            if name.endswith(".weight") and meta.dtype.startswith("F8_"):
                found[name.removesuffix(".weight")] = self._linear(name.removesuffix(".weight"), tensors)
        return found

    def _linear(self, prefix: str, tensors: dict[str, TensorMeta]) -> QuantLinear:
        weight = tensors[f"{prefix}.weight"]
        if weight.dtype != "F8_E4M3":
            raise CheckpointError(f"{prefix}.weight is {weight.dtype}; the engine's FP8 layout is e4m3 "
                                  "(float8_e4m3fn). " + UNQUANTIZED_FIX)
        if len(weight.shape) != 2:
            raise CheckpointError(f"{prefix}.weight has shape {list(weight.shape)}, not [out, in].")
        out_features, in_features = weight.shape
        _check_tensor(tensors, f"{prefix}.weight_scale", None, None)
        scale = tensors[f"{prefix}.weight_scale"]
        if torch.Size(scale.shape).numel() not in (1, out_features):
            raise CheckpointError(f"{prefix}.weight_scale has shape {list(scale.shape)}: block- or group-wise FP8 "
                                  "scales, but the engine's FP8 layout has one scale per output channel (per-tensor "
                                  "and per-channel checkpoints import). " + UNQUANTIZED_FIX)
        return QuantLinear(prefix, out_features, in_features, weight.file)

    def check_act_order(self, source: SourceCheckpoint, linears: dict[str, QuantLinear]) -> None:
        """FP8 has no act-order."""

    def virtual_tensors(self, linear: QuantLinear, group: int | None) -> dict[str, TensorMeta]:
        out, inp, file = linear.out_features, linear.in_features, linear.file
        return {f"{linear.prefix}.qweight": TensorMeta(file, "F8_E4M3", (out, inp)),
                f"{linear.prefix}.scales": TensorMeta(file, "F32", (out,))}

    def convert(self, source: SourceCheckpoint, linear: QuantLinear, group: int | None) -> dict[str, torch.Tensor]:
        """The engine's (qweight float8_e4m3fn [out, in] as stored, scales float32 [out])."""
        scale = source.read(f"{linear.prefix}.weight_scale").float().reshape(-1)  # [1] or [out]
        return {"qweight": source.read(f"{linear.prefix}.weight"), "scales": scale.expand(linear.out_features).clone()}


# ---------------------------------------------------------------- the checkpoint as the partitioner sees it

class PrequantizedSource:
    """A SourceCheckpoint whose quantized linears show the engine's tensors (see the module doc)."""

    def __init__(self, base: SourceCheckpoint, fmt, linears: dict[str, QuantLinear], group: int | None, config: dict):
        self.base, self.fmt, self.linears, self.group = base, fmt, linears, group
        self.directory = base.directory
        hidden = {n for linear in linears.values() for n in fmt.raw_names(linear.prefix)}
        self.tensors = {n: m for n, m in base.tensors.items() if n not in hidden and not _RUNTIME_SCALES.search(n)}
        self.virtual = {n: (linear, n.rpartition(".")[2]) for linear in linears.values()
                        for n in fmt.virtual_tensors(linear, group)}
        for linear in linears.values():
            self.tensors.update(fmt.virtual_tensors(linear, group))
        self.quantization = {"mode": fmt.mode, "format": fmt.name, "source_config": config}
        if group:  # the engine's groups, and the checkpoint's (-1: one per row) they lie inside
            self.quantization.update(group_size=group, checkpoint_group_size=fmt.group_size)
        self._converted: tuple[str | None, dict] = (None, {})

    def hf_config(self):
        return self.base.hf_config()

    def tokenizer_files(self) -> list[Path]:
        return self.base.tokenizer_files()

    def read(self, name: str, dim: int = 0, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        if name not in self.virtual:
            return self.base.read(name, dim, start, stop)
        linear, part = self.virtual[name]
        tensor = self._convert(linear)[part]
        return tensor if start is None else tensor.narrow(dim, start, stop - start).contiguous()

    def _convert(self, linear: QuantLinear) -> dict[str, torch.Tensor]:
        """The linear's engine tensors; the last one is kept, since the partitioner reads a
        linear's qweight, scales and offsets one after another."""
        if self._converted[0] != linear.prefix:
            self._converted = (linear.prefix, self.fmt.convert(self.base, linear, self.group))
        return self._converted[1]


def wrap(source: SourceCheckpoint, model: ModelConfig, tp: int) -> SourceCheckpoint | PrequantizedSource:
    """The source as the partitioner reads it: unchanged when unquantized, else a PrequantizedSource.
    Every refusal happens here, from metadata, before any output is written."""
    config = read_quantization_config(source.directory)
    if config is None:
        _refuse_unexplained_quantized_tensors(source)
        return source
    fmt = parse_format(config)
    linears = fmt.linears(source.tensors)
    _check_linears(fmt, linears, model)
    fmt.check_act_order(source, linears)
    group = check_int4_layout(fmt, model, tp) if isinstance(fmt, Int4Format) else None
    log.info("importing %d %s linear layers as %s%s without dequantizing", len(linears), fmt.name, fmt.mode,
             f" (groups of {group})" if group else "")
    return PrequantizedSource(source, fmt, linears, group, config)


def _families_reading_prequantized() -> list[str]:
    from dist_infer.models import BUILT_IN

    return [t for t in BUILT_IN if family_of(t).quantizable_linears]


def _refuse_unexplained_quantized_tensors(source: SourceCheckpoint) -> None:
    """Packed or FP8 tensors without a quantization_config saying how to read them."""
    odd = [n for n, m in source.tensors.items() if n.endswith(".qweight") or m.dtype.startswith("F8_")]
    if odd:
        raise CheckpointError(f"{source.directory} holds quantized tensors (e.g. {odd[0]}) but its config.json has "
                              "no quantization_config saying how to read them; restore config.json from the model's "
                              "download (dist_infer imports " + ", ".join(SUPPORTED) + ").")


def _check_linears(fmt, linears: dict[str, QuantLinear], model: ModelConfig) -> None:
    """Only decoder linears may be quantized (embeddings and LM head stay in the model dtype),
    q/k/v and gate/up all or none (the engine fuses them); dense ones are quantized by the build."""
    family = family_of(model.architecture)  # its decoder linears' names, and which the engine fuses
    if not family.quantizable_linears:
        raise CheckpointError(f"this is a pre-quantized ({fmt.name}) {model.architecture} checkpoint; the "
                              f"{model.architecture} family reads unquantized weights only (pre-quantized "
                              "checkpoints are read for the families that declare their quantizable linears: "
                              f"{', '.join(_families_reading_prequantized())}). " + UNQUANTIZED_FIX)
    if not linears:
        raise CheckpointError(f"the quantization_config says {fmt.name} but no tensor is quantized that way; "
                              "restore the checkpoint from its download.")
    inside = re.compile(re.escape(family.layer_prefix).replace(r"\{layer\}", r"\d+")
                        + "(" + "|".join(map(re.escape, family.quantizable_linears)) + ")")
    outside = sorted(p for p in linears if not (family.quantizable_linears and inside.fullmatch(p)))
    if outside:
        raise CheckpointError(f"{outside[0]} is quantized in this checkpoint; dist_infer keeps embeddings and the LM "
                              "head in the model dtype and quantizes only decoder linear layers. Use a checkpoint "
                              "with an unquantized head (`lm_head` in the quantizer's ignore list). " + UNQUANTIZED_FIX)
    for layer in range(model.num_layers):
        prefix = family.layer_prefix.format(layer=layer)
        for fused in family.fused_linears:
            quantized = [m for m in fused if f"{prefix}{m}" in linears]
            if quantized and len(quantized) != len(fused):
                raise CheckpointError(f"layer {layer}: {', '.join(quantized)} quantized but not all of "
                                      f"{', '.join(fused)}, which the engine fuses into one weight. " + UNQUANTIZED_FIX)
    dense = model.num_layers * len(family.quantizable_linears) - len(linears)
    if dense:
        log.warning("%d decoder linear layers are not quantized in this checkpoint; the build quantizes them to %s "
                    "with its own scales", dense, fmt.mode)
