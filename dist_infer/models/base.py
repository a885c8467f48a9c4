"""What a model family declares (see models/__init__.py).

Sharding kinds of a HF weight (`WeightRule.kind`); shapes are the engine's [out, in]
(a Conv1D weight stored [in, out] says `transpose=True`):
    COLUMN     split the output dim over TP (q, gate/up, fc_in and their biases)
    KV_COLUMN  split by KV heads, replicated when tp exceeds them (k, v)
    ROW        split the input dim over TP; 1-D tensors (biases, per-channel scales) replicated
    REPLICATE  every TP rank of the layer's stage (norms)
    FUSED_QKV  q, k, v concatenated along the outputs (GPT-2 c_attn, Baichuan W_pack): split
               into `outputs` (q, k, v names), each sharded as COLUMN / KV_COLUMN
    EMBED      vocab-parallel token table, first stage (and the last, as the head, when tied)
    LM_HEAD    vocab-parallel head (weight and bias), last stage; dropped when tied
    FIRST      replicated on the first stage (learned position table)
    LAST       replicated on the last stage (final norm)
    IGNORE     recomputed, never loaded (rotary tables, attention masks)
Rule patterns are full-match regexes over the HF name; the groups `layer` (decoder layers)
and `param` fill the `outputs` templates (`str.format`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

COLUMN, KV_COLUMN, ROW, REPLICATE, FUSED_QKV = "column", "kv_column", "row", "replicate", "fused_qkv"
EMBED, LM_HEAD, FIRST, LAST, IGNORE = "embed", "lm_head", "first", "last", "ignore"
KINDS = (COLUMN, KV_COLUMN, ROW, REPLICATE, FUSED_QKV, EMBED, LM_HEAD, FIRST, LAST, IGNORE)
# Transforms applied to a shard after it is read (partition time).
TRANSPOSE, NORMALIZE_ROWS = "transpose", "normalize_rows"


@dataclass(frozen=True)
class WeightRule:
    pattern: str
    kind: str
    outputs: tuple[str, ...] = ()  # FUSED_QKV: the q, k, v names; else one optional rename
    transpose: bool = False        # 2-D source stored [in, out] (Conv1D)
    transform: str = ""            # NORMALIZE_ROWS (Baichuan's NormHead)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown sharding kind {self.kind!r}; one of {KINDS}")
        object.__setattr__(self, "regex", re.compile(self.pattern))

    def match(self, name: str):
        return self.regex.fullmatch(name)


@dataclass(frozen=True)
class Family:
    """One model family. `layer_sources` maps an engine module inside `layers.N` to the
    checkpoint modules (under `layer_prefix`) concatenated along dim 0 into it;
    `top_sources` the same for `embed`, `pos_embed`, `norm`, `lm_head`."""

    name: str
    config_from_hf: Callable[[Any], Any]                 # HF config -> ModelConfig
    weight_rules: tuple[WeightRule, ...]
    required_weights: Callable[[Any], set[str]]          # ModelConfig -> HF names a checkpoint must hold
    layer_prefix: str                                    # "model.layers.{layer}."
    layer_sources: dict[str, tuple[str, ...]]
    top_sources: dict[str, str]
    decoder_layer: Callable[..., Any]                    # (cfg, layer_slot, tp, dtype, linear) -> nn.Module
    # Checkpoints transformers cannot read (remote code): config.json dict -> a HF-like config.
    read_config: Callable[[dict], Any] | None = None
    # Pre-quantized import (partition/prequantized.py): linear modules inside a layer, and
    # the groups the engine fuses (all quantized or none).
    quantizable_linears: tuple[str, ...] = ()
    fused_linears: tuple[tuple[str, ...], ...] = field(default=())

    def sources_of(self, local: str) -> tuple[str, ...]:
        """Checkpoint modules of the engine module `local` inside a layer; a key with `{expert}`
        stands for every expert (`mlp.experts.{expert}.down_proj`)."""
        if local in self.layer_sources:
            return self.layer_sources[local]
        head, index, tail = _split_index(local)
        sources = self.layer_sources[f"{head}{{expert}}{tail}"]
        return tuple(s.format(expert=index) for s in sources)

    def rule_for(self, name: str):
        """(rule, match) of the first rule matching `name`, or (None, None)."""
        for rule in self.weight_rules:
            if m := rule.match(name):
                return rule, m
        return None, None


def _split_index(local: str) -> tuple[str, str, str]:
    """"mlp.experts.3.down_proj" -> ("mlp.experts.", "3", ".down_proj")."""
    m = re.fullmatch(r"(.*?\.)(\d+)(\..*)", local)
    if m is None:
        raise KeyError(local)
    return m.group(1), m.group(2), m.group(3)
