"""IncrementalDetokenizer against whole-output decoding, on the embedded
model's real tokenizer; stop strings across token boundaries."""

from __future__ import annotations

import random

import pytest

from dist_infer.scheduler import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)


def _stream(tokenizer, ids, stop=()):
    d = IncrementalDetokenizer(tokenizer, stop)
    parts = []
    for i, t in enumerate(ids):
        d.add(t)
        done = d.stopped_at is not None or i == len(ids) - 1
        parts.append(d.delta(done))
        if d.stopped_at is not None:
            break
    return d, "".join(parts)


TEXTS = ["The capital of France is Paris.", "naïve café — 東京 🚀 emoji test\n\nnew paragraph",
         "def f(x):\n    return x ** 2  # squares"]


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_equals_full_decode(tokenizer, text):
    ids = tokenizer(text)["input_ids"]
    d, streamed = _stream(tokenizer, ids)
    assert streamed == d.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_random_ids_stream_equals_full_decode(tokenizer):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(len(tokenizer)) for _ in range(30)]
        d, streamed = _stream(tokenizer, ids)
        assert streamed == tokenizer.decode(ids, skip_special_tokens=True)


def test_incomplete_character_at_the_end_is_flushed(tokenizer):
    ids = tokenizer("🚀")["input_ids"]
    assert len(ids) > 1  # one character over several byte tokens
    d, streamed = _stream(tokenizer, ids[:-1])  # ends mid-character
    assert streamed == tokenizer.decode(ids[:-1]) and streamed.endswith("\ufffd")


def test_stop_string_cut_from_text_and_ids(tokenizer):
    ids = tokenizer("Hello world. Stop here please")["input_ids"]
    d, streamed = _stream(tokenizer, ids, stop=("Stop here",))
    assert d.text == "Hello world. " == streamed
    kept = ids[:d.ids_before_stop()]
    assert tokenizer.decode(kept) == "Hello world."  # " Stop" holds the space: it goes with the stop string


def test_stop_string_spanning_tokens_never_half_streamed(tokenizer):
    ids = tokenizer("one two three four five")["input_ids"]
    d = IncrementalDetokenizer(tokenizer, ("three four",))
    streamed = ""
    for t in ids:
        d.add(t)
        streamed += d.delta(d.stopped_at is not None)
        assert "three" not in streamed
        if d.stopped_at is not None:
            break
    assert streamed == "one two "


def test_stop_at_start_keeps_no_tokens(tokenizer):
    ids = tokenizer("STOP and more")["input_ids"]
    d, streamed = _stream(tokenizer, ids, stop=("STOP",))
    assert streamed == "" and d.ids_before_stop() == 0
