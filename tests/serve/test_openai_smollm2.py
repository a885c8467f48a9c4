"""The official `openai` client against `mpirun -n 3 dist-infer serve` on the
embedded SmolLM2 (TP=3): chat and completions, streamed and not, against
`dist-infer run`, transformers' logprobs and `dist_infer.LLM`; bad requests;
Triton routes; metrics; and a SIGTERM drain at the end."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import openai
import pytest
import torch

from conftest import run_cli
from .server import Server

TP = 3
QUESTION = "What is the capital of France?"
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def engine(smollm2_engine):
    """The session's SmolLM2 TP=3 engine (max batch 8, max seq 512; test_generate runs it too)."""
    return smollm2_engine(TP, 1)


@pytest.fixture(scope="module")
def server(engine):
    srv = Server(engine, TP, "--served-model-name", "smol", "--shutdown-timeout", "60").wait_healthy()
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def _chat(client, **kw):
    return client.chat.completions.create(model="smol", messages=[{"role": "user", "content": QUESTION}], **kw)


def test_models_and_version(client, server):
    assert [m.id for m in client.models.list().data] == ["smol"]
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_chat_greedy_equals_run_and_streaming(client, engine):
    full = _chat(client, max_tokens=24, temperature=0)
    text = full.choices[0].message.content
    assert "Paris" in text and full.choices[0].finish_reason == "stop"
    assert full.usage.completion_tokens > 0 and full.usage.total_tokens == full.usage.prompt_tokens + \
        full.usage.completion_tokens
    chunks = list(_chat(client, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    run = run_cli("run", "--engine", str(engine), "--prompt", QUESTION, "--max-new-tokens", "24", world=TP,
                  timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == text


def test_completions_stream_equals_nonstream_and_stop(client):
    kw = dict(model="smol", prompt="The three primary colors are", max_tokens=30, temperature=0)
    full = client.completions.create(**kw).choices[0]
    streamed = "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True) if c.choices)
    assert streamed == full.text and full.finish_reason in ("stop", "length")
    cut = full.text[len(full.text) // 3:][:6]
    assert cut.strip()
    stopped = client.completions.create(**kw, stop=[cut]).choices[0]
    assert stopped.text == full.text[:full.text.index(cut)] and stopped.finish_reason == "stop"
    streamed_stop = "".join(c.choices[0].text for c in client.completions.create(**kw, stop=[cut], stream=True)
                            if c.choices)
    assert streamed_stop == stopped.text


def test_batch_prompts_and_token_ids(client):
    res = client.completions.create(model="smol", prompt=["Hello, my name is", "1, 2, 3,"], max_tokens=8,
                                    temperature=0)
    assert sorted(c.index for c in res.choices) == [0, 1]
    by_ids = client.completions.create(model="smol", prompt=[1, 2, 3, 4, 5], max_tokens=4, temperature=0)
    assert by_ids.usage.prompt_tokens == 5 and by_ids.usage.completion_tokens == 4


def test_seeded_sampling_reproducible(client):
    kw = dict(model="smol", prompt="Once upon a time", max_tokens=16, temperature=1.0, top_p=0.95)
    a = client.completions.create(**kw, seed=11).choices[0].text
    b = client.completions.create(**kw, seed=11).choices[0].text
    c = client.completions.create(**kw, seed=12).choices[0].text
    assert a == b and a != c


def test_logprobs_equal_model_logits(client, smollm2_hf):
    model, tok = smollm2_hf
    prompt = "The capital of Germany is"
    res = client.completions.create(model="smol", prompt=prompt, max_tokens=3, temperature=0, logprobs=5)
    lp = res.choices[0].logprobs
    ids = tok(prompt)["input_ids"]
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0, -1].log_softmax(-1)
    top = ref.topk(5)
    assert list(lp.top_logprobs[0].keys()) == [tok.decode([i]) for i in top.indices.tolist()]
    for got, want in zip(lp.top_logprobs[0].values(), top.values.tolist()):
        assert abs(got - want) < 2e-3
    assert lp.tokens[0] == tok.decode([top.indices[0].item()])  # greedy picks the top one
    assert abs(lp.token_logprobs[0] - top.values[0].item()) < 2e-3
    chat = _chat(client, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)


def test_echo_prompt_logprobs_equal_model_logits(client, smollm2_hf):
    """lm-eval's `local-completions` scoring: echo, logprobs, max_tokens 0."""
    model, tok = smollm2_hf
    prompt = "Paris is the capital of France"
    ids = tok(prompt)["input_ids"]
    res = client.completions.create(model="smol", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0)
    choice = res.choices[0]
    assert choice.text == prompt and res.usage.completion_tokens == 0
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    want = [ref[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert max(abs(g - w) for g, w in zip(lp.token_logprobs[1:], want)) < 2e-3
    # Streamed, and then with generation after the prompt: the same prompt logprobs.
    chunks = list(client.completions.create(model="smol", prompt=prompt, max_tokens=2, echo=True, logprobs=1,
                                            temperature=0, stream=True))
    first = chunks[0].choices[0].logprobs
    assert first.token_logprobs[0] is None
    assert max(abs(g - w) for g, w in zip(first.token_logprobs[1:len(ids)], want)) < 2e-3
    assert chunks[0].choices[0].text.startswith(prompt)


def test_llm_api_gives_server_tokens(client, engine):
    from dist_infer import LLM

    served = client.completions.create(model="smol", prompt="The sky is", max_tokens=12, temperature=0).choices[0]
    with LLM(engine) as llm:
        out = llm.generate(["The sky is"], max_tokens=12)[0]
        streamed = "".join(llm.stream("The sky is", max_tokens=12))
    assert out.text == served.text == streamed


BAD = [
    ("POST", "/v1/completions", "not json", 400),
    ("POST", "/v1/completions", [1, 2], 400),
    ("POST", "/v1/completions", {"prompt": "hi"}, 400),                                   # no model
    ("POST", "/v1/completions", {"model": "nope", "prompt": "hi"}, 404),
    ("POST", "/v1/completions", {"model": "smol"}, 400),                                  # no prompt
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "temperature": -1}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "top_p": 2}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 0}, 400),         # 0 needs echo
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": "ten"}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "max_tokens": 100000}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi " * 600}, 400),           # context too long
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "n": 2}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "logprobs": 21}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": [1, 99999999]}, 400),        # id outside vocab
    ("POST", "/v1/completions", {"model": "smol", "prompt": []}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "stop": ["a"] * 5}, 400),
    ("POST", "/v1/completions", {"model": "smol", "prompt": "hi", "seed": -3}, 400),
    ("POST", "/v1/chat/completions", {"model": "smol", "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": "smol", "messages": [{"role": "wizard", "content": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "smol", "messages": [{"role": "user", "content": "x"}],
                                      "top_logprobs": 3}, 400),
    ("POST", "/v2/models/smol/generate", {"max_tokens": 3}, 400),
    ("POST", "/v2/models/other/generate", {"text_input": "x"}, 404),
    ("GET", "/v1/nothing-here", None, 404),
]


@pytest.mark.parametrize("method,path,body,status", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_bad_requests_get_openai_errors(server, method, path, body, status):
    content = body if isinstance(body, str) else json.dumps(body) if body is not None else None
    r = httpx.request(method, f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                      timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert server.health() == 200


def test_triton_routes(server):
    assert httpx.get(f"{server.url}/v2/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/v2/models/smol").json()["name"] == "smol"
    body = {"text_input": "The capital of France is", "max_tokens": 6, "parameters": {"temperature": 0}}
    out = httpx.post(f"{server.url}/v2/models/smol/generate", json=body, timeout=60).json()["text_output"]
    with httpx.stream("POST", f"{server.url}/v2/models/smol/generate_stream", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    assert "".join(e["text_output"] for e in events) == out and "Paris" in out


def test_metrics(server, client):
    client.completions.create(model="smol", prompt="Hi", max_tokens=2, temperature=0)
    assert server.metric("dist_infer:generation_tokens_total") >= 2
    assert server.metric("dist_infer:prompt_tokens_total") >= 1
    assert server.metric("dist_infer:time_to_first_token_seconds_count") >= 1
    assert server.metric("dist_infer:request_success_total") >= 1
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "inter_token_latency_seconds_count", "e2e_request_latency_seconds_count",
                 "request_queue_time_seconds_count"):
        server.metric(f"dist_infer:{name}")  # present (a missing name sums to 0 but must parse)
    assert "dist_infer:kv_cache_usage_perc" in httpx.get(f"{server.url}/metrics").text


def test_sigterm_drains_last(server, client):
    """Runs last in this module: SIGTERM to rank 0 while a stream runs (Open MPI's mpirun
    turns a SIGTERM of its own into a kill of every rank, so an operator signals rank 0,
    as `scancel` does under srun); the stream finishes, new requests get 503, every process
    exits 0 and none is left."""
    result = {}

    def long_stream():
        chunks = client.completions.create(model="smol", prompt="Write a long story:", max_tokens=200,
                                           temperature=0, stream=True, extra_body={"ignore_eos": True})
        result["text"] = [c.choices[0].finish_reason for c in chunks if c.choices]

    t = threading.Thread(target=long_stream)
    t.start()
    time.sleep(3)
    code_holder = {}
    _, rank0 = server.frontend_and_rank0()
    stopper = threading.Thread(target=lambda: code_holder.setdefault("code", server.stop(signal.SIGTERM, 120, rank0)))
    stopper.start()
    time.sleep(1.5)
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "smol", "prompt": "x"}, timeout=10)
    assert r.status_code == 503 and r.headers.get("retry-after")
    t.join(120)
    stopper.join(150)
    assert result["text"][-1] == "length"          # the in-flight request ran to its end
    assert code_holder["code"] == 0, server.output()
    assert server.orphans() == []
    assert "died" not in server.output(), server.output()[-3000:]  # an orderly exit is no rank's death
