"""Beam search bookkeeping on rank 0, one decode step at a time, as transformers'
`GenerationMixin._beam_search` does it (transformers 5.x, generation/utils.py).

A request with `num_beams=k` runs as up to k sequences of the engine (its beams);
each step every running beam's row of the sampler's log-softmax comes back as its
top `candidates` (token, logprob) pairs: the top `candidates` continuations over all
beams (beam score + token logprob) are always among them. This module picks the
next beams from those rows; the engine then forks, keeps or frees the sequences.

Semantics followed exactly (float32 arithmetic, as transformers' tensors):
- candidates = max(2, 1 + number of EOS ids) * k, so at least k of them do not end;
- a candidate among the top k that ends (EOS, or the length limit) becomes a finished
  hypothesis scored `score / generated_len ** length_penalty`; the best k are kept;
- the running beams are the best k candidates that do not end;
- the search stops when every candidate ends (length limit), when `early_stopping is
  True` and k hypotheses are finished, or when no running beam can beat the worst
  finished hypothesis (the heuristic: the running beam's score at its current length,
  or at the longest length when early_stopping == "never" and length_penalty > 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dist_infer.engine.sampling import MAX_LOGPROBS
from dist_infer.errors import RequestError

EARLY_STOPPING = (True, False, "never")


@dataclass(frozen=True)
class BeamSearchParams:
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False  # True | False | "never", as transformers' GenerationConfig
    num_return_sequences: int = 1

    def __post_init__(self):
        if self.num_beams < 1:
            raise RequestError(f"num_beams must be >= 1, got {self.num_beams}")
        if self.early_stopping not in EARLY_STOPPING or isinstance(self.early_stopping, int) and \
                not isinstance(self.early_stopping, bool):
            raise RequestError(f"early_stopping must be true, false or 'never', got {self.early_stopping!r}")
        if not 1 <= self.num_return_sequences <= self.num_beams:
            raise RequestError(f"num_return_sequences must be in [1, num_beams={self.num_beams}], "
                               f"got {self.num_return_sequences}")

    def candidates(self, num_eos: int) -> int:
        """Continuations kept per step (transformers' `beams_to_keep`)."""
        return max(2, 1 + num_eos) * self.num_beams

    def check_candidates(self, num_eos: int) -> None:
        if self.candidates(num_eos) > MAX_LOGPROBS:
            most = MAX_LOGPROBS // max(2, 1 + num_eos)
            raise RequestError(f"num_beams={self.num_beams} needs the top {self.candidates(num_eos)} logprobs of "
                               f"each beam, more than the sampler returns ({MAX_LOGPROBS}); use num_beams <= {most}.")


@dataclass(frozen=True)
class BeamChoice:
    """A running beam of the next step: the beam it extends (index into the running beams) and its token."""

    parent: int
    token: int


@dataclass
class Hypothesis:
    score: float          # sum of logprobs / generated_len ** length_penalty
    output_ids: list[int]


class BeamSearch:
    def __init__(self, params: BeamSearchParams, eos_ids: set[int], max_new_tokens: int):
        self.params = params
        self.eos_ids = set(eos_ids)
        self.max_new_tokens = max_new_tokens
        self.num_candidates = params.candidates(len(self.eos_ids))
        self.scores = torch.zeros(1)          # [running beams] float32: sum of token logprobs
        self.outputs: list[list[int]] = [[]]  # running beams' generated tokens (one beam before the first step)
        self.finished: list[Hypothesis] = []  # best first, at most num_beams
        self.improvable = True                # transformers' is_early_stop_heuristic_unsatisfied
        self.done = False

    @property
    def num_generated(self) -> int:
        return len(self.outputs[0])

    def step(self, top_ids: torch.Tensor, top_logprobs: torch.Tensor) -> list[BeamChoice]:
        """top_ids, top_logprobs: [running beams, >= num_candidates] each beam's best next tokens.
        Returns the next running beams (empty once done)."""
        n = self.num_candidates
        ids, lps = top_ids[:, :n].cpu(), top_logprobs[:, :n].float().cpu()
        totals = (self.scores[:, None] + lps).flatten()          # [beams * n]
        scores, flat = totals.topk(n)                            # the n best continuations, best first
        parents, tokens = (flat // n).tolist(), ids.flatten()[flat].tolist()
        ends = torch.tensor([self._ends(t) for t in tokens])      # [n] bool
        self._add_finished(scores, parents, tokens, ends)
        if bool(ends.all()):
            self.done = True
            return []
        choices = self._next_running(scores, parents, tokens, ends)
        self._update_improvable()
        return choices

    def _ends(self, token: int) -> bool:
        return token in self.eos_ids or self.num_generated + 1 >= self.max_new_tokens

    def _add_finished(self, scores: torch.Tensor, parents: list[int], tokens: list[int], ends: torch.Tensor) -> None:
        """Ending candidates among the top num_beams become hypotheses (transformers' _update_finished_beams;
        its blocking penalties only apply on a step after which the search has stopped)."""
        k = self.params.num_beams
        penalized = scores / ((self.num_generated + 1) ** self.params.length_penalty)  # float32, as transformers
        for i in range(k):
            if bool(ends[i]):
                self.finished.append(Hypothesis(float(penalized[i]), self.outputs[parents[i]] + [tokens[i]]))
        self.finished.sort(key=lambda h: -h.score)  # stable: earlier hypotheses win ties
        del self.finished[k:]

    def _next_running(self, scores: torch.Tensor, parents: list[int], tokens: list[int],
                      ends: torch.Tensor) -> list[BeamChoice]:
        running = scores + ends.to(torch.float32) * -1.0e9
        best = running.topk(self.params.num_beams).indices.tolist()
        self.scores = running[best]
        self.outputs = [self.outputs[parents[i]] + [tokens[i]] for i in best]
        return [BeamChoice(parents[i], tokens[i]) for i in best]

    def _update_improvable(self) -> None:
        """Can the best running beam still beat the worst kept hypothesis? (_check_early_stop_heuristic)"""
        p = self.params
        full = len(self.finished) == p.num_beams
        if p.early_stopping == "never" and p.length_penalty > 0.0:
            length = self.max_new_tokens
        else:
            length = self.num_generated
        best_possible = self.scores[:1] / (length ** p.length_penalty)
        worst = torch.tensor([self.finished[-1].score if full else -1.0e9])
        self.improvable = self.improvable and bool((best_possible > worst).all())
        self.done = not self.improvable or (full and p.early_stopping is True)

    def best(self) -> list[Hypothesis]:
        """The hypotheses to return, best first."""
        return self.finished[:self.params.num_return_sequences]
