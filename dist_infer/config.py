"""Typed configuration: the model, the parallel layout (`Mapping`) and the build.

All rank math lives in `Mapping`. Every config is a frozen dataclass that
validates itself on construction and round-trips through a plain dict (that is
what checkpoint `config.json` and `engine.json` store).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from dist_infer.errors import CheckpointError, EngineError, LaunchError, LayoutError

NORMS = ("rms", "layer")
ACTIVATIONS = ("silu", "gelu_tanh", "gelu")
POSITION_EMBEDDINGS = ("rope", "learned")


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise CheckpointError(f"{cls.__name__}: unknown fields {sorted(unknown)}; "
                              "the file was written by a newer dist_infer — upgrade dist_infer.")
    return cls(**data)


@dataclass(frozen=True)
class Mapping:
    """Where one rank sits in a TP x PP grid. TP is innermost:
    ranks 0..tp-1 form pipeline stage 0, and so on."""

    tp: int = 1
    pp: int = 1
    rank: int = 0

    def __post_init__(self):
        for name in ("tp", "pp"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise LayoutError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.rank < self.world_size:
            raise LayoutError(f"rank {self.rank} is outside world size {self.world_size} (tp={self.tp} x pp={self.pp})")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp

    @property
    def tp_group_ranks(self) -> list[int]:
        return [self.pp_rank * self.tp + i for i in range(self.tp)]

    @property
    def pp_group_ranks(self) -> list[int]:
        return [stage * self.tp + self.tp_rank for stage in range(self.pp)]

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_stage_rank(self) -> int | None:
        """The same TP rank in the previous stage (it sends us hidden states)."""
        return None if self.is_first_stage else self.rank - self.tp

    @property
    def next_stage_rank(self) -> int | None:
        return None if self.is_last_stage else self.rank + self.tp

    @property
    def sampler_rank(self) -> int:
        """TP rank 0 of the last stage samples and sends tokens to rank 0."""
        return (self.pp - 1) * self.tp

    def with_rank(self, rank: int) -> Mapping:
        return Mapping(self.tp, self.pp, rank)

    def stage_layers(self, num_layers: int, stage: int | None = None) -> range:
        """Contiguous, balanced layer range of a stage; the first
        `num_layers % pp` stages take one extra layer."""
        stage = self.pp_rank if stage is None else stage
        base, extra = divmod(num_layers, self.pp)
        start = stage * base + min(stage, extra)
        return range(start, start + base + (1 if stage < extra else 0))

    def to_dict(self) -> dict[str, int]:
        return {"tp": self.tp, "pp": self.pp}

    @classmethod
    def from_dict(cls, data: dict[str, Any], rank: int = 0) -> Mapping:
        return cls(tp=int(data["tp"]), pp=int(data["pp"]), rank=rank)


@dataclass(frozen=True)
class ModelConfig:
    """The shape dist_infer needs, mapped from a HF config by the model's family
    (dist_infer/models/): everything the engine builds from, so it never reads the HF config.

    norm: "rms" or "layer" (LayerNorm, with a bias when norm_bias); rms_norm_eps is its epsilon
        (either kind: the name predates LayerNorm families and stays for older checkpoints).
    activation: "silu", "gelu_tanh" (GPT-2's gelu_new) or "gelu"; gated_mlp: act(gate) * up
        (Llama) rather than act(fc_in) (GPT-2).
    position_embedding: "rope" (rope_inv_freq [rotary_dim/2]) or "learned" (a position table of
        max_position_embeddings rows); rotary_dim: dims of each head RoPE turns (None: all);
        rope_interleaved: RoPE pairs neighbouring dims (GPT-J) rather than the two halves.
    parallel_residual: attention and MLP read the same normed input and add to the stream once (GPT-J).
    """

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # RoPE frequencies [rotary_dim/2] and the cos/sin scale (llama3/yarn change both).
    rope_inv_freq: tuple[float, ...] = ()
    rope_attention_scaling: float = 1.0
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    norm: str = "rms"
    norm_bias: bool = False
    activation: str = "silu"
    gated_mlp: bool = True
    position_embedding: str = "rope"
    rotary_dim: int | None = None
    rope_interleaved: bool = False
    parallel_residual: bool = False
    lm_head_bias: bool = False
    # Sparse MoE (Mixtral): experts per MLP (0: a dense MLP) and how many each token is routed to;
    # intermediate_size is one expert's.
    num_experts: int = 0
    experts_per_token: int = 0

    def __post_init__(self):
        from dist_infer.models import FAMILY_MODULES, is_supported

        if not is_supported(self.architecture):
            raise CheckpointError(f"model type {self.architecture!r} is not supported; "
                                  f"dist_infer runs {', '.join(FAMILY_MODULES)}.")
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(f"{self.num_heads} attention heads are not a multiple of "
                                  f"{self.num_kv_heads} KV heads; the checkpoint config is inconsistent.")
        for name, allowed in (("norm", NORMS), ("activation", ACTIVATIONS), ("position_embedding", POSITION_EMBEDDINGS)):
            if getattr(self, name) not in allowed:
                raise CheckpointError(f"{name} {getattr(self, name)!r} is not supported; one of {', '.join(allowed)}.")
        if not 0 < self.rotary_dims <= self.head_dim or self.rotary_dims % 2:
            raise CheckpointError(f"rotary_dim {self.rotary_dim} must be even and in (0, head_dim={self.head_dim}].")
        if self.num_experts and not 1 <= self.experts_per_token <= self.num_experts:
            raise CheckpointError(f"experts_per_token {self.experts_per_token} must be in 1..{self.num_experts} "
                                  "(num_experts).")
        want = self.rotary_dims // 2 if self.position_embedding == "rope" else 0
        if len(self.rope_inv_freq) != want:
            raise CheckpointError(f"rope_inv_freq has {len(self.rope_inv_freq)} entries, expected {want} "
                                  "(rotary_dim/2 with RoPE, none with learned positions)")
        object.__setattr__(self, "rope_inv_freq", tuple(float(f) for f in self.rope_inv_freq))
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @classmethod
    def from_hf(cls, hf_config) -> ModelConfig:
        """From a `transformers.PretrainedConfig`, through its model type's family."""
        from dist_infer.models import family_of

        return family_of(hf_config.model_type).config_from_hf(hf_config)

    @property
    def rotary_dims(self) -> int:
        return self.head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = (3 if self.gated_mlp else 2) * self.hidden_size * self.intermediate_size * max(self.num_experts, 1)
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp + 2 * self.hidden_size) + embed + self.hidden_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["rope_inv_freq"] = list(self.rope_inv_freq)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data)


# ---------------------------------------------------------------- layouts

def tp_problems(model: ModelConfig, tp: int) -> list[str]:
    """Why this TP size cannot shard the model (empty when it can)."""
    problems = []
    if model.num_heads % tp:
        problems.append(f"tp={tp} does not divide the {model.num_heads} attention heads")
    if model.num_kv_heads % tp and tp % model.num_kv_heads:
        problems.append(f"tp={tp} neither divides the {model.num_kv_heads} KV heads nor is a multiple of them "
                        "(KV heads are split, or replicated when tp is a multiple of them)")
    if model.intermediate_size % tp:
        problems.append(f"tp={tp} does not divide the MLP size {model.intermediate_size}")
    return problems


def valid_tp_sizes(model: ModelConfig, limit: int = 64) -> list[int]:
    return [t for t in range(1, limit + 1) if not tp_problems(model, t)]


def check_layout(model: ModelConfig, tp: int, pp: int) -> None:
    """Refuse, before any work, a layout that cannot run this model."""
    Mapping(tp, pp)  # positive sizes
    problems = tp_problems(model, tp)
    if pp > model.num_layers:
        problems.append(f"pp={pp} is more pipeline stages than the model's {model.num_layers} layers")
    if not problems:
        return
    valid = valid_tp_sizes(model)
    world = tp * pp
    hint = [f"Valid TP sizes for this model: {', '.join(map(str, valid))}.",
            f"Valid PP sizes: 1..{model.num_layers}."]
    alternatives = [(t, world // t) for t in valid if world % t == 0 and world // t <= model.num_layers]
    if alternatives:
        hint.append(f"For {world} GPUs use " + " or ".join(f"--tp {t} --pp {p}" for t, p in alternatives) + ".")
    raise LayoutError("Layout tp={} pp={} cannot run this model: {}. {}".format(tp, pp, "; ".join(problems), " ".join(hint)))


# Weight quantization modes, with TensorRT-LLM's names (see engine/quant.py).
QUANT_MODES = ("int8_wo", "int4_wo", "fp8")
DEFAULT_QUANT_GROUP_SIZE = 128


@dataclass(frozen=True)
class QuantConfig:
    """How a build stores the linear layers' weights.

    mode: None (model dtype), int8_wo (INT8, per-output-channel scales, W8A16),
          int4_wo (INT4 packed two per byte, a scale and an offset per `group_size` inputs, W4A16),
          fp8 (float8 e4m3 weights with per-output-channel scales and per-token
          FP8 activations).
    lm_head: quantize the LM head too (the embedding table always stays in the model dtype).
    """

    mode: str | None = None
    group_size: int = DEFAULT_QUANT_GROUP_SIZE
    lm_head: bool = False

    def __post_init__(self):
        if self.mode is not None and self.mode not in QUANT_MODES:
            raise LayoutError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(QUANT_MODES)} "
                              "(or leave --quant out to keep the model dtype).")
        size = self.group_size
        # Power of two: groups pack whole bytes and tile GPU kernels; >= 16 keeps scales a small overhead.
        if not isinstance(size, int) or isinstance(size, bool) or size < 16 or size & (size - 1):
            raise LayoutError(f"quantization group size must be a power of two >= 16 (e.g. 128, 64, 32), "
                              f"got {size!r}.")
        if self.lm_head and self.mode is None:
            raise LayoutError("--quant-lm-head needs a --quant mode (int8_wo, int4_wo or fp8).")


@dataclass(frozen=True)
class BuildConfig:
    """Options fixed when an engine is built."""

    dtype: str = "float32"
    max_batch_size: int = 8
    max_seq_len: int | None = None  # None: the model's max_position_embeddings, capped at DEFAULT_MAX_SEQ_LEN
    kv_block_size: int = 16
    quant: str | None = None  # None or one of QUANT_MODES
    quant_group_size: int = DEFAULT_QUANT_GROUP_SIZE  # inputs per INT4 scale (int4_wo only)
    quant_lm_head: bool = False

    DTYPES = ("float32", "bfloat16", "float16")
    DEFAULT_MAX_SEQ_LEN = 4096

    def __post_init__(self):
        if self.dtype not in self.DTYPES:
            raise LayoutError(f"dtype {self.dtype!r} is not supported; choose one of {', '.join(self.DTYPES)}.")
        for name in ("max_batch_size", "max_seq_len", "kv_block_size"):
            value = getattr(self, name)
            if value is None and name == "max_seq_len":
                continue
            if not isinstance(value, int) or value < 1:
                raise LayoutError(f"{name} must be a positive integer, got {value!r}")
        QuantConfig(self.quant, self.quant_group_size, self.quant_lm_head)  # validates them

    @property
    def quant_config(self) -> QuantConfig:
        return QuantConfig(self.quant, self.quant_group_size, self.quant_lm_head)

    def resolved(self, model: ModelConfig) -> BuildConfig:
        """Concrete limits for this model; refuses a max_seq_len the model cannot position."""
        if self.max_seq_len is None:
            return dataclasses.replace(self, max_seq_len=min(model.max_position_embeddings, self.DEFAULT_MAX_SEQ_LEN))
        if self.max_seq_len > model.max_position_embeddings:
            raise LayoutError(f"--max-seq-len {self.max_seq_len} exceeds the model's max_position_embeddings "
                              f"{model.max_position_embeddings}; use at most {model.max_position_embeddings}.")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BuildConfig:
        """engine.json's build options; a bad value there is a damaged or foreign engine."""
        try:
            return _from_dict(cls, data)
        except LayoutError as exc:
            raise EngineError(f"engine.json build options are invalid: {exc} Rebuild the engine with "
                              "`dist-infer build ... --force`.") from exc


# KV cache storage, chosen at run time (vLLM's --kv-cache-dtype): "auto" keeps the
# engine's dtype; "fp8" stores float8 e4m3 (one scale per layer for K and for V),
# half the bytes of bf16, so the same memory holds twice the blocks.
KV_CACHE_DTYPES = ("auto", "fp8")
DEFAULT_KV_FREE_GPU_MEMORY_FRACTION = 0.9  # TensorRT-LLM's default


@dataclass(frozen=True)
class KVCacheConfig:
    """How a rank sizes and stores its paged KV pool (TensorRT-LLM's KvCacheConfig).

    dtype: one of KV_CACHE_DTYPES.
    free_gpu_memory_fraction: share of the GPU memory still free after the weights load
        and the step's working memory is set aside that the pool may take (None: 0.9).
        GPU only: a CPU rank has no comparable number and ignores it (with a warning).
    max_bytes: at most this many bytes of pool per rank (None: no byte cap); on CPU the
        only budget. With both, the smaller wins, as in TensorRT-LLM.
    The pool never exceeds max_batch_size full-length sequences per pipeline stage, and every rank
    takes the block count of the tightest rank.
    """

    dtype: str = "auto"
    free_gpu_memory_fraction: float | None = None
    max_bytes: int | None = None

    def __post_init__(self):
        if self.dtype not in KV_CACHE_DTYPES:
            raise LaunchError(f"unknown KV cache dtype {self.dtype!r}; choose one of {', '.join(KV_CACHE_DTYPES)} "
                              "(auto = the engine's dtype).")
        fraction = self.free_gpu_memory_fraction
        if fraction is not None and not (isinstance(fraction, (int, float)) and 0 < fraction <= 1):
            raise LaunchError(f"KV cache free GPU memory fraction must be in (0, 1], got {fraction!r} "
                              f"(default {DEFAULT_KV_FREE_GPU_MEMORY_FRACTION}).")
        size = self.max_bytes
        if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
            raise LaunchError(f"KV cache byte size must be a positive integer, got {size!r}.")

    @property
    def memory_fraction(self) -> float:
        return DEFAULT_KV_FREE_GPU_MEMORY_FRACTION if self.free_gpu_memory_fraction is None \
            else self.free_gpu_memory_fraction

    def cli_args(self) -> list[str]:
        """The run/serve/bench flags that give this config (for ranks started by mpirun)."""
        args = [] if self.dtype == "auto" else ["--kv-cache-dtype", self.dtype]
        if self.free_gpu_memory_fraction is not None:
            args += ["--kv-cache-free-gpu-memory-fraction", repr(self.free_gpu_memory_fraction)]
        if self.max_bytes is not None:
            args += ["--kv-cache-bytes", str(self.max_bytes)]
        return args
