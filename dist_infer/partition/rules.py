"""Sharding rules: which ranks get which slice of each HF weight.

Each model family names the kind of each of its weights (dist_infer/models/base.py); this
file turns a kind into slices. For the Llama family, weights are [out_features, in_features]:
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
A Conv1D weight (GPT-2) is stored [in, out]: its shard is cut along the source's dims and
transposed (`Shard.transform`); a fused q/k/v tensor (GPT-2 c_attn, Baichuan W_pack) is cut
into the q, k and v shards the Llama path has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dist_infer.config import Mapping, ModelConfig
from dist_infer.errors import CheckpointError
from dist_infer.models import family_of
from dist_infer.models.base import (COLUMN, EMBED, FIRST, FUSED_QKV, IGNORE, KV_COLUMN, LAST, LM_HEAD, REPLICATE,
                                    ROW, TRANSPOSE, WeightRule)

REPLICATED = -1


@dataclass(frozen=True)
class Shard:
    rank: int
    name: str    # name in the rank file
    source: str  # name in the source checkpoint
    dim: int     # split dim of the source, or REPLICATED
    start: int   # [start, stop) of the source along dim
    stop: int
    length: int  # the shard's extent along dim; > stop - start means zero padding (vocab)
    transform: str = ""  # applied after reading: "transpose" (Conv1D), "normalize_rows" (NormHead)


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


def _out_dim(rule: WeightRule, shape) -> int:
    """The source dim holding the output features (Conv1D weights: 1)."""
    return 1 if rule.transpose and len(shape) == 2 else 0


def _transform(rule: WeightRule, shape) -> str:
    return TRANSPOSE if rule.transpose and len(shape) == 2 else rule.transform


def _kv_slice(model: ModelConfig, tp: int, tp_rank: int, offset: int = 0) -> tuple[int, int]:
    heads = kv_head_range(model, tp, tp_rank)
    return offset + heads.start * model.head_dim, offset + heads.stop * model.head_dim


def _tp_slices(rule: WeightRule, model: ModelConfig, tp: int, tp_rank: int, shape) -> list[tuple[int, int, int, int]]:
    """(output index, dim, start, stop) of one layer-scoped weight for one TP rank."""
    out_dim = _out_dim(rule, shape)
    if rule.kind == COLUMN:
        return [(0, out_dim, *_split(shape[out_dim], tp, tp_rank))]
    if rule.kind == KV_COLUMN:
        return [(0, out_dim, *_kv_slice(model, tp, tp_rank))]
    if rule.kind == FUSED_QKV:  # [q | k | v] along the outputs
        q = _split(model.q_size, tp, tp_rank)
        return [(0, out_dim, *q), (1, out_dim, *_kv_slice(model, tp, tp_rank, model.q_size)),
                (2, out_dim, *_kv_slice(model, tp, tp_rank, model.q_size + model.kv_size))]
    if rule.kind == ROW and len(shape) == 2:  # the weight (dense or quantized [out, in/2]), INT4 group scales
        in_dim = 1 - out_dim
        return [(0, in_dim, *_split(shape[in_dim], tp, tp_rank))]
    if rule.kind in (ROW, REPLICATE):  # biases, per-output-channel scales [out] of the whole row, norms
        return [(0, REPLICATED, 0, shape[0])]
    raise CheckpointError(f"sharding kind {rule.kind!r} cannot apply to a decoder-layer weight")


def _output_name(rule: WeightRule, match, index: int, name: str) -> str:
    return rule.outputs[index].format(**match.groupdict()) if rule.outputs else name


def _layer_shards(name: str, rule: WeightRule, match, shape, model: ModelConfig, tp: int, pp: int) -> list[Shard]:
    layer = int(match.group("layer"))
    if layer >= model.num_layers:
        raise CheckpointError(f"{name}: layer {layer} but config.json says {model.num_layers} layers.")
    grid = Mapping(tp, pp)
    stage = next(s for s in range(pp) if layer in grid.stage_layers(model.num_layers, s))
    shards = []
    for rank in _stage_ranks(stage, tp):
        for index, dim, start, stop in _tp_slices(rule, model, tp, rank % tp, shape):
            shards.append(Shard(rank, _output_name(rule, match, index, name), name, dim, start, stop, stop - start,
                                _transform(rule, shape)))
    return shards


def _stage_ranks(stage: int, tp: int) -> list[int]:
    return [stage * tp + t for t in range(tp)]


def _vocab_shards(name: str, rule: WeightRule, head: str, model: ModelConfig, tp: int, pp: int) -> list[Shard]:
    """Embedding table to the first stage (and, tied, as the head's weight to the last); head (weight,
    bias) to the last. `head`: the head's checkpoint module, as the build reads it."""
    head_name = f"{head}.{name.rpartition('.')[2]}"
    if rule.kind == LM_HEAD and model.tie_word_embeddings:
        return []  # some tied checkpoints store a copy; the embedding is the source of truth
    targets = [(pp - 1, rule.outputs[0] if rule.outputs else head_name)] if rule.kind == LM_HEAD else [(0, name)]
    if rule.kind == EMBED and model.tie_word_embeddings and pp > 1:
        targets.append((pp - 1, f"{head}.weight"))
    per_rank = padded_vocab(model, tp) // tp
    shards = []
    for stage, out_name in targets:
        for rank in _stage_ranks(stage, tp):
            start = (rank % tp) * per_rank
            stop = min(start + per_rank, model.vocab_size)
            shards.append(Shard(rank, out_name, name, 0, start, max(start, stop), per_rank, rule.transform))
    return shards


def plan_tensor(name: str, shape: tuple[int, ...], model: ModelConfig, tp: int, pp: int) -> list[Shard]:
    """Every shard of one source tensor, for every rank that needs it (the model family's rule)."""
    family = family_of(model.architecture)
    rule, match = family.rule_for(name)
    if rule is None:
        in_layer = re.match(re.escape(family.layer_prefix).replace(r"\{layer\}", r"\d+"), name)
        what = "layer weight" if in_layer else "weight"
        raise CheckpointError(f"unknown {what} {name!r}; is this a {family.name}-family checkpoint "
                              f"({model.architecture})?")
    if rule.kind == IGNORE:
        return []
    if "layer" in match.groupdict():
        return _layer_shards(name, rule, match, shape, model, tp, pp)
    if rule.kind in (EMBED, LM_HEAD):
        return _vocab_shards(name, rule, family.top_sources["lm_head"], model, tp, pp)
    stage = {FIRST: 0, LAST: pp - 1}[rule.kind]
    return [Shard(r, name, name, REPLICATED, 0, shape[0], shape[0]) for r in _stage_ranks(stage, tp)]
