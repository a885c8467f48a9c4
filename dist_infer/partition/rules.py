"""Sharding rules: which ranks get which slice of each HF weight.

Llama-family weights are [out_features, in_features]:
- column-parallel (split the output dim 0): q/k/v, gate/up and their biases;
- row-parallel (split the input dim 1): o_proj, down_proj; their biases are
  replicated and added once, after the all-reduce;
- vocab-parallel (split dim 0, padded to a multiple of tp): embed_tokens, lm_head;
- replicated: norms.
A pre-quantized checkpoint's linears arrive in the engine's form (partition/prequantized.py):
`qweight`, `scales`, `offsets` are [out, ...] and split like the weight (row-parallel: along
dim 1, where INT4 groups never straddle ranks); a per-output-channel scale [out] of a
row-parallel layer is replicated.
K/V heads are split when tp divides them and replicated when tp is a multiple
of them (rank r then holds KV head r // (tp / kv_heads), which is exactly the
head its query heads attend with).
Each pipeline stage owns a contiguous layer range; embeddings go to the first
stage, final norm and LM head to the last (tied embeddings to both).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dist_infer.config import Mapping, ModelConfig
from dist_infer.errors import CheckpointError

REPLICATED = -1
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# Tensors some checkpoints carry that are recomputed, not loaded.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")
# A row-parallel linear's tensors: dense `weight`, or a pre-quantized checkpoint's engine-form
# `qweight`, `scales`, `offsets` (partition/prequantized.py), and `bias`.
_ROW_PARALLEL_PARAMS = ("weight", "qweight", "scales", "offsets", "bias")


@dataclass(frozen=True)
class Shard:
    rank: int
    name: str    # name in the rank file
    source: str  # name in the source checkpoint
    dim: int     # split dim, or REPLICATED
    start: int   # [start, stop) of the source along dim
    stop: int
    length: int  # the shard's extent along dim; > stop - start means zero padding (vocab)


def padded_vocab(model: ModelConfig, tp: int) -> int:
    return -(-model.vocab_size // tp) * tp


def kv_head_range(model: ModelConfig, tp: int, tp_rank: int) -> range:
    """The KV heads a TP rank holds (one replicated head when tp > kv heads)."""
    kv = model.num_kv_heads
    if kv >= tp:
        per_rank = kv // tp
        return range(tp_rank * per_rank, (tp_rank + 1) * per_rank)
    head = tp_rank // (tp // kv)
    return range(head, head + 1)


def _split(n: int, tp: int, tp_rank: int) -> tuple[int, int]:
    per_rank = n // tp
    return tp_rank * per_rank, (tp_rank + 1) * per_rank


def _layer_rule(param: str, model: ModelConfig, tp: int, tp_rank: int, shape) -> tuple[int, int, int]:
    """(dim, start, stop) of one layer weight for one TP rank."""
    hd = model.head_dim
    if param.startswith("self_attn.q_proj."):
        return (0, *_split(shape[0], tp, tp_rank))
    if param.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
        heads = kv_head_range(model, tp, tp_rank)
        return 0, heads.start * hd, heads.stop * hd
    if param.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
        return (0, *_split(shape[0], tp, tp_rank))
    module, _, leaf = param.rpartition(".")
    if module in ("self_attn.o_proj", "mlp.down_proj") and leaf in _ROW_PARALLEL_PARAMS:
        if len(shape) == 2:  # the weight (dense or quantized [out, in/2]) and INT4 group scales [out, in/group]
            return (1, *_split(shape[1], tp, tp_rank))
        return REPLICATED, 0, shape[0]  # bias, and per-output-channel scales [out] (FP8) of the whole row
    if param in ("input_layernorm.weight", "post_attention_layernorm.weight"):
        return REPLICATED, 0, shape[0]
    raise CheckpointError(f"unknown layer weight 'model.layers.N.{param}'; is this a Llama-family checkpoint?")


def plan_tensor(name: str, shape: tuple[int, ...], model: ModelConfig, tp: int, pp: int) -> list[Shard]:
    """Every shard of one source tensor, for every rank that needs it."""
    grid = Mapping(tp, pp)

    def stage_ranks(stage: int) -> list[int]:
        return [stage * tp + t for t in range(tp)]

    if _IGNORED.search(name):
        return []
    if m := _LAYER.match(name):
        layer, param = int(m.group(1)), m.group(2)
        if layer >= model.num_layers:
            raise CheckpointError(f"{name}: layer {layer} but config.json says {model.num_layers} layers.")
        stage = next(s for s in range(pp) if layer in grid.stage_layers(model.num_layers, s))
        shards = []
        for rank in stage_ranks(stage):
            dim, start, stop = _layer_rule(param, model, tp, rank % tp, shape)
            shards.append(Shard(rank, name, name, dim, start, stop, stop - start))
        return shards
    if name == "model.norm.weight":
        return [Shard(r, name, name, REPLICATED, 0, shape[0], shape[0]) for r in stage_ranks(pp - 1)]
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        if name == "lm_head.weight" and model.tie_word_embeddings:
            return []  # some tied checkpoints store a copy; the embedding is the source of truth
        targets = []
        if name == "model.embed_tokens.weight":
            targets.append((0, name))
        if name == "lm_head.weight" or (model.tie_word_embeddings and pp > 1):
            targets.append((pp - 1, "lm_head.weight"))
        per_rank = padded_vocab(model, tp) // tp
        shards = []
        for stage, out_name in targets:
            for rank in stage_ranks(stage):
                start = (rank % tp) * per_rank
                stop = min(start + per_rank, model.vocab_size)
                shards.append(Shard(rank, out_name, name, 0, start, max(start, stop), per_rank))
        return shards
    raise CheckpointError(f"unknown weight {name!r}; is this a Llama-family checkpoint?")
