"""Hypothesis over the request validation, in process: the pydantic request models, the
front-end's prompt/sampling checks (the functions the routes call) and the engine's
own request checks (LLMEngine.validate, SamplingParams). For any JSON body: a 4xx
(ValidationError or APIError) or an engine request the engine accepts; never another
exception (which the server would answer with a 500).

The real server is fuzzed from its OpenAPI schema in test_fuzz_http.py."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from pydantic import ValidationError

from dist_infer.serve.api_server import (ServerState, chat_request, completion_requests, triton_request)
from dist_infer.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, TritonGenerateRequest
from dist_infer.workers.llm_engine import LLMEngine

MODEL, MAX_LEN = "m", 64
EXAMPLES = settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)

# Anything JSON can carry, lone surrogates and huge numbers included.
text = st.text(st.characters(exclude_categories=()), max_size=40)  # lone surrogates too
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.integers(-3, 400)
           | st.floats(allow_nan=True, allow_infinity=True) | text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=12)


def mostly(plausible, wild_in_10: int = 2):
    """A field's value: usually plausible, sometimes any JSON value."""
    return st.integers(0, 9).flatmap(lambda i: json_values if i < wild_in_10 else plausible)


token_ids = st.lists(st.integers(-2, 50_000), max_size=80)
SAMPLING = dict(
    model=st.sampled_from([MODEL] * 6 + ["other", ""]), max_tokens=st.integers(-1, 70), temperature=st.floats(-0.2, 2.2),
    top_p=st.floats(-0.1, 1.1), top_k=st.integers(-2, 100), seed=st.integers(-1, 2**64), stream=st.booleans(),
    stop=st.one_of(text, st.lists(text, max_size=6)), ignore_eos=st.booleans(), n=st.sampled_from([1, 1, 1, 0, 2]),
    stream_options=st.fixed_dictionaries({"include_usage": st.booleans()}), presence_penalty=st.sampled_from([0.0, 0.0, 0.5]))
COMPLETION = dict(SAMPLING, prompt=st.one_of(text, token_ids, st.lists(text, max_size=3),
                                             st.lists(token_ids, max_size=3)),
                  logprobs=st.integers(-1, 22), echo=st.booleans(), suffix=st.sampled_from(["", "", "x"]))
message = st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "user", "assistant", "tool", "wizard"]),
                                 "content": st.one_of(st.none(), text, st.lists(st.fixed_dictionaries(
                                     {"type": st.sampled_from(["text", "text", "image_url"]), "text": text}), max_size=2))})
CHAT = dict(SAMPLING, messages=st.lists(message, min_size=1, max_size=4), max_completion_tokens=st.integers(-1, 100),
            logprobs=st.booleans(), top_logprobs=st.integers(-1, 25))
TRITON = dict(text_input=text, max_tokens=st.integers(-1, 100),
              parameters=st.dictionaries(st.sampled_from(["temperature", "top_p", "top_k", "seed", "stop",
                                                          "max_tokens", "ignore_eos", "random_seed"]), scalars))


def bodies(fields: dict, required: tuple[str, ...]) -> st.SearchStrategy[dict]:
    """A JSON object: the required keys (usually), some optional ones, maybe an unknown one."""
    optional = st.lists(st.sampled_from(sorted(set(fields) - set(required))), max_size=3, unique=True)
    keep_required = st.integers(0, 19).map(lambda i: i > 0)
    return st.tuples(optional, keep_required, st.fixed_dictionaries({k: mostly(v, 1) for k, v in fields.items()}),
                     st.dictionaries(st.sampled_from(["extra", "user", "logit_bias"]), json_values, max_size=1)).map(
        lambda t: json.loads(json.dumps({**t[3], **{k: v for k, v in t[2].items()
                                                    if k in t[0] or (k in required and t[1])}})))


@pytest.fixture(scope="module")
def state(smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    return ServerState(None, tokenizer, MODEL, MAX_LEN, len(tokenizer), 4, 8, None, None)


def engine_accepts(state, request) -> None:
    """LLMEngine.validate, the engine's own check, on the request the front-end built."""
    engine = SimpleNamespace(spec=SimpleNamespace(model=SimpleNamespace(vocab_size=state.vocab_size)),
                             max_seq_len=state.max_model_len, tokenizer=state.tokenizer)
    LLMEngine.validate(engine, request)
    assert 1 <= request.max_new_tokens and len(request.prompt_ids) + request.max_new_tokens <= MAX_LEN


def outcome(make_requests) -> str:
    """'invalid' (a 4xx) or 'accepted'; anything else fails the test."""
    try:
        requests = make_requests()
    except ValidationError:
        return "invalid"
    except APIError as exc:
        assert 400 <= exc.status < 500, exc.message
        json.dumps(exc.body()).encode("utf-8")  # the error body itself can be sent
        return "invalid"
    return requests


@EXAMPLES
@given(body=bodies(COMPLETION, ("model", "prompt")))
def test_completions_validation(state, body):
    requests = outcome(lambda: completion_requests(state, CompletionRequest.model_validate(body))[1])
    for request in requests if requests != "invalid" else []:
        engine_accepts(state, request)


@EXAMPLES
@given(body=bodies(CHAT, ("model", "messages")))
def test_chat_validation(state, body):
    request = outcome(lambda: chat_request(state, ChatCompletionRequest.model_validate(body)))
    if request != "invalid":
        engine_accepts(state, request)


@EXAMPLES
@given(body=bodies(TRITON, ("text_input",)), name=st.sampled_from([MODEL, "x"]))
def test_triton_validation(state, body, name):
    request = outcome(lambda: triton_request(state, name, TritonGenerateRequest.model_validate(body)))
    if request != "invalid":
        engine_accepts(state, request)
