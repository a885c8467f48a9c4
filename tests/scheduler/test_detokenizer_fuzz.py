"""Hypothesis: the incremental detokenizer never raises, on SmolLM2's real tokenizer, for
any token id sequence (byte-fallback tokens that split a multi-byte character, streams
that end mid-character, special tokens) and any stop strings; what it streams is what it
finally holds, and without stops that equals decoding the whole output at once."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from dist_infer.scheduler import IncrementalDetokenizer

EXAMPLES = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def byte_tokens(tokenizer) -> list[int]:
    """Tokens of single bytes (ByteLevel BPE): sequences of them split UTF-8 characters anywhere."""
    return sorted({tokenizer.convert_tokens_to_ids(t) for t in tokenizer.get_vocab() if len(t) == 1})


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[IncrementalDetokenizer, str]:
    d, parts = IncrementalDetokenizer(tokenizer, stop), []
    for i, token in enumerate(ids):
        d.add(token)
        done = d.stopped_at is not None or i == len(ids) - 1
        parts.append(d.delta(done))
        if done:
            break
    return d, "".join(parts)


@EXAMPLES
@given(data=st.data())
def test_any_token_ids_never_crash(tokenizer, byte_tokens, data):
    anywhere = st.integers(0, len(tokenizer) - 1)
    ids = data.draw(st.lists(st.one_of(anywhere, st.sampled_from(byte_tokens)), min_size=1, max_size=40))
    d, streamed = stream(tokenizer, ids)
    assert streamed == d.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert d.ids_before_stop() == len(ids)


@EXAMPLES
@given(text=st.text(max_size=60), stop=st.lists(st.text(min_size=1, max_size=4), max_size=3), cut=st.integers(0, 8))
def test_any_unicode_prompt_text_and_stops(tokenizer, text, stop, cut):
    """Text of any script, emoji, control characters; the stream cut off `cut` tokens early
    (mid-character, say): no exception, streamed == held, a stop string never streamed."""
    ids = tokenizer(text)["input_ids"] or [0]
    ids = ids[:max(1, len(ids) - cut)]
    d, streamed = stream(tokenizer, ids, tuple(stop))
    assert streamed == d.text
    if d.stopped_at is not None:
        assert not any(s in d.text for s in stop)
    assert 0 <= d.ids_before_stop() <= len(ids)
