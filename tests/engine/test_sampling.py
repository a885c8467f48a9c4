"""Sampler: greedy, top-k, top-p, temperature, seeded reproducibility."""

from __future__ import annotations

import math

import pytest
import torch

from dist_infer.engine.sampling import Sampler, SamplingParams, filter_logits
from dist_infer.errors import RequestError

V = 50


def _logits(batch: int, seed: int = 0, vocab: int = V) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, vocab, generator=g) * 2


def _draw(sampler: Sampler, logits_rows: list[torch.Tensor], seq_ids: list[int]) -> list[int]:
    return sampler(torch.stack(logits_rows), seq_ids).tolist()


def test_greedy_is_argmax():
    s = Sampler()
    for i in range(4):
        s.add(i, SamplingParams())
    logits = _logits(4)
    assert SamplingParams().greedy
    assert s(logits, [0, 1, 2, 3]).tolist() == logits.argmax(-1).tolist()


def test_top_k_1_equals_greedy():
    s = Sampler()
    for i in range(3):
        s.add(i, SamplingParams(temperature=1.5, top_k=1, seed=i))
    for step in range(20):
        logits = _logits(3, seed=step)
        assert s(logits, [0, 1, 2]).tolist() == logits.argmax(-1).tolist()


def test_seeded_sampling_reproducible():
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=1234)
    runs = []
    for _ in range(2):
        s = Sampler()
        s.add(0, params)
        runs.append([s(_logits(1, seed=step), [0]).item() for step in range(40)])
    assert runs[0] == runs[1]
    # A different seed gives a different stream (40 draws from a broad distribution).
    s = Sampler()
    s.add(0, SamplingParams(temperature=1.0, top_k=20, top_p=0.95, seed=99))
    other = [s(_logits(1, seed=step), [0]).item() for step in range(40)]
    assert other != runs[0]
    # And it is not greedy.
    assert runs[0] != [_logits(1, seed=step).argmax().item() for step in range(40)]


def test_sampling_independent_of_batch_composition():
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7)
    row = {step: _logits(1, seed=100 + step)[0] for step in range(30)}

    alone = Sampler()
    alone.add(5, params)
    solo = [alone(row[step][None], [5]).item() for step in range(30)]

    crowd = Sampler()
    crowd.add(1, SamplingParams(temperature=1.0, seed=7))      # same seed, other sequence
    crowd.add(2, SamplingParams())                              # greedy neighbour
    crowd.add(5, params)
    crowd.add(3, SamplingParams(temperature=2.0, top_k=5, seed=3))
    mixed = []
    for step in range(30):
        others = _logits(3, seed=500 + step)
        # seq 5 sits at a different row each step, among varying neighbours
        ids = [[5, 1, 2, 3], [1, 5, 3], [3, 2, 5], [5]][step % 4]
        rows = [row[step] if i == 5 else others[j % 3] for j, i in enumerate(ids)]
        mixed.append(_draw(crowd, rows, ids)[ids.index(5)])
        if step == 10:
            crowd.drop(1)  # a neighbour finishes
            crowd.add(1, SamplingParams(temperature=1.0, seed=11))
    assert mixed == solo


def test_top_k_keeps_k_largest():
    logits = _logits(1)[0]
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_k=5))
    kept = torch.isfinite(out).nonzero().flatten().tolist()
    assert sorted(kept) == sorted(torch.topk(logits, 5).indices.tolist())
    torch.testing.assert_close(out[kept], logits[kept])


def test_temperature_scales_logits():
    logits = _logits(1)[0]
    torch.testing.assert_close(filter_logits(logits, SamplingParams(temperature=2.0)), logits / 2)


@pytest.mark.parametrize("top_p, nucleus", [(0.4, [0]), (0.6, [0, 1]), (0.75, [0, 1]), (0.85, [0, 1, 2]),
                                            (0.97, [0, 1, 2, 3]), (1.0, [0, 1, 2, 3, 4])])
def test_top_p_keeps_minimal_nucleus(top_p, nucleus):
    # Token probabilities in rank order 0.5, 0.3, 0.15, 0.04, 0.01, placed at shuffled vocab ids.
    probs = [0.5, 0.3, 0.15, 0.04, 0.01]
    ids = [3, 0, 4, 1, 2]  # vocab id of the rank-r token
    logits = torch.empty(5)
    for r, i in enumerate(ids):
        logits[i] = math.log(probs[r])
    out = filter_logits(logits, SamplingParams(temperature=1.0, top_p=top_p))
    kept = sorted(torch.isfinite(out).nonzero().flatten().tolist())
    assert kept == sorted(ids[r] for r in nucleus)
    # Sampling never leaves the nucleus, and reaches all of it.
    s = Sampler()
    s.add(0, SamplingParams(temperature=1.0, top_p=top_p, seed=0))
    seen = {s(logits[None], [0]).item() for _ in range(1000)}
    assert seen == set(kept)


def test_filters_match_transformers_warpers():
    """Temperature -> top-k -> top-p keeps exactly the tokens transformers' warpers keep."""
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    for seed in range(20):
        logits = _logits(1, seed=seed, vocab=200)
        t, k, p = 0.7 + 0.1 * (seed % 5), [0, 10, 40][seed % 3], [1.0, 0.9, 0.5, 0.2][seed % 4]
        ref = TemperatureLogitsWarper(t)(None, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(None, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(None, ref)
        ours = filter_logits(logits[0], SamplingParams(temperature=t, top_k=k, top_p=p))
        assert torch.equal(torch.isfinite(ours), torch.isfinite(ref[0])), (seed, t, k, p)
        keep = torch.isfinite(ours)
        torch.testing.assert_close(ours[keep], ref[0][keep])


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
])
def test_invalid_params_raise_request_error(kwargs, words):
    with pytest.raises(RequestError, match=words):
        SamplingParams(**kwargs)
