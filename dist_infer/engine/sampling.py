"""Token sampling: greedy, temperature, top-k, top-p, with a per-sequence seeded
generator so a request's samples do not depend on what else is in the batch."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_infer.errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, then top-p, as transformers orders them. logits [V] float32."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = sorted_logits.softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


class Sampler:
    """Lives on the rank that samples (TP rank 0 of the last stage)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self._generators: dict[int, torch.Generator] = {}
        self._params: dict[int, SamplingParams] = {}

    def add(self, seq_id: int, params: SamplingParams) -> None:
        self._params[seq_id] = params
        if not params.greedy:
            self._generators[seq_id] = torch.Generator(self.device).manual_seed(params.seed)

    def drop(self, seq_id: int) -> None:
        self._params.pop(seq_id, None)
        self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, seq_ids: list[int]) -> torch.Tensor:
        """logits [B, V] float32 -> tokens [B] int64."""
        tokens = logits.argmax(-1)
        for row, seq_id in enumerate(seq_ids):
            params = self._params[seq_id]
            if params.greedy:
                continue
            probs = filter_logits(logits[row], params).softmax(-1)
            tokens[row] = torch.multinomial(probs, 1, generator=self._generators[seq_id])[0]
        return tokens
