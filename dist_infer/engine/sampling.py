"""Token sampling, vectorised over the batch: greedy, temperature, top-k, top-p,
and log-probabilities.

Each request draws from its own random stream (a `random.Random` seeded by the
request), one uniform number per sampled token, so a request's samples do not
depend on what else is in the batch, on preemption or on chunked prefill. The
filtering and the draw are batched tensor ops: rows are sorted once, top-k and
top-p cut the sorted rows, and the token is found by inverse CDF.

Token i of a seeded request always uses draw i of its stream. A request resumed
after an engine restart (prompt + the tokens already delivered) says how many
it sampled before (`resume_at`), and its stream skips that many draws, so a
seeded answer is the same with or without a restart.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from dist_infer.engine.transfer import to_device
from dist_infer.errors import RequestError

MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None   # None = a random stream
    logprobs: int | None = None  # None = no logprobs; k = the sampled token's and the top k's
    prompt_logprobs: int | None = None  # the same for every prompt token after the first (`echo`)
    resume_at: int = 0  # tokens sampled before a restart: the random stream starts after their draws
    # Beam search (rank 0 only: workers/beam_search.py; the ranks just see greedy rows with logprobs)
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as transformers
    num_return_sequences: int = 1       # hypotheses kept in the answer (Completion.beams), <= num_beams

    def __post_init__(self):
        if not self.temperature >= 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise RequestError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if self.resume_at < 0:
            raise RequestError(f"resume_at must be >= 0, got {self.resume_at}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Logprobs:
    """Per sampled row: the token's logprob and the top-k alternatives (k = the batch's largest ask)."""

    token: torch.Tensor     # [S] float32
    top_ids: torch.Tensor   # [S, k] int64
    top: torch.Tensor       # [S, k] float32


def _sorted_filtered(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                     top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature, then top-k, then top-p, as transformers orders them.
    logits [B, V] float32; per-row params [B]. Returns (sorted filtered logits, sort order)."""
    scaled = logits / temperature[:, None]
    ordered, order = scaled.sort(dim=-1, descending=True)
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), vocab)
    kth = ordered.gather(1, (k - 1)[:, None])
    ordered = ordered.masked_fill(ordered < kth, float("-inf"))  # ties with the k-th stay, as in transformers
    probs = ordered.softmax(-1)
    # Keep the smallest prefix whose mass reaches top_p (always at least one token).
    # (top_p = 1 is off: float rounding must not let cumsum reach 1 early and cut the tail.)
    drop = ((probs.cumsum(-1) - probs) >= top_p[:, None]) & (top_p < 1)[:, None]
    return ordered.masked_fill(drop, float("-inf")), order


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """One row's filtered logits, in vocabulary order. logits [V] float32."""
    ordered, order = _sorted_filtered(logits[None], *_param_tensors([params], logits.device))
    return torch.empty_like(ordered).scatter_(1, order, ordered)[0]


def _param_tensors(params: list[SamplingParams], device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (to_device([p.temperature for p in params], torch.float32, device),
            to_device([p.top_k for p in params], torch.int64, device),
            to_device([p.top_p for p in params], torch.float32, device))


def _stream_at(seed: int | None, draws_done: int) -> random.Random:
    """The request's random stream, past the draws of the tokens it sampled before a restart."""
    stream = random.Random(seed)
    for _ in range(draws_done):
        stream.random()
    return stream


class Sampler:
    """Lives on the rank that samples (TP rank 0 of the last stage)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._params: dict[int, SamplingParams] = {}
        self._streams: dict[int, random.Random] = {}

    def add(self, seq_id: int, params: SamplingParams) -> None:
        self._params[seq_id] = params
        self._streams[seq_id] = _stream_at(params.seed, params.resume_at)

    def drop(self, seq_id: int) -> None:
        self._params.pop(seq_id, None)
        self._streams.pop(seq_id, None)

    def params(self, seq_id: int) -> SamplingParams:
        return self._params[seq_id]

    def __call__(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """logits [B, V] float32 -> tokens [B] int64."""
        tokens = logits.argmax(-1)
        rows = [i for i, s in enumerate(seq_ids) if not self._params[s].greedy]
        if rows:
            at = to_device(rows, torch.int64, logits.device)
            tokens[at] = self._draw(logits[at], [seq_ids[i] for i in rows])
        return tokens

    def _draw(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """Inverse-CDF draw over the filtered rows, one uniform number per row."""
        ordered, order = _sorted_filtered(logits, *_param_tensors([self._params[s] for s in seq_ids], logits.device))
        cdf = ordered.softmax(-1).cumsum(-1)  # [S, V]
        u = to_device([self._streams[s].random() for s in seq_ids], torch.float32, logits.device)
        pick = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).clamp(max=logits.shape[-1] - 1)
        return order.gather(1, pick)[:, 0]

    @staticmethod
    def logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> Logprobs:
        """Log-probabilities of the model's own distribution (before temperature and filters)
        of `tokens` and the top k. logits [S, V] float32, tokens [S]."""
        lp = logits.log_softmax(-1)
        top = lp.topk(k, dim=-1) if k else None
        empty = lp.new_empty(lp.shape[0], 0)
        return Logprobs(lp.gather(1, tokens[:, None])[:, 0], top.indices if top else empty.long(),
                        top.values if top else empty)
