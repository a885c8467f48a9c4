"""The HTTP front-end process: FastAPI on uvicorn, OpenAI and Triton routes.

Rank 0 starts it (`dist-infer serve`); it tokenizes, applies the chat
template, streams SSE and keeps the metrics, and talks to rank 0's engine loop
through the EngineClient. It never blocks a step.

Shutdown: the first SIGTERM/SIGINT drains (new requests get 503, running ones
finish, at most --shutdown-timeout), the second exits at once. If rank 0 dies,
/health turns 503 and the process exits 1 shortly after.

With `serve --enable-admin`, POST /admin/update_weights makes every rank take the weights of a
refitted engine between two steps (serve/admin.py); without it that route answers 403.

Under `serve --restart N` (serve_supervised) this process is the top one instead:
it binds the engine sockets, and a Supervisor (serve/supervisor.py) starts the
rank job as its child and starts it again when it fails; meanwhile /health is
503 "restarting" and requests wait for the new engine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import dist_infer
from dist_infer.client import EngineClient, EngineDeadError, EngineDrainingError
from dist_infer.engine.runtime import EngineSpec
from dist_infer.engine.sampling import SamplingParams
from dist_infer.errors import RequestError
from dist_infer.serve.admin import AdminEngineClient, install_admin_routes
from dist_infer.serve.limits import BodySizeLimit, HttpLimits, deadline_protocol
from dist_infer.serve.metrics import Metrics, RequestTimer
from dist_infer.serve.protocol import (APIError, ChatCompletionRequest, CompletionRequest, SamplingFields,
                                       TritonGenerateRequest)
from dist_infer.workers.engine_loop import EngineAddresses
from dist_infer.workers.llm_engine import Request, RequestOutput
from dist_infer.workers.prompts import load_tokenizer

log = logging.getLogger("dist_infer.serve")
RETRY_AFTER = {"Retry-After": "1"}
MAX_HEADER_BYTES = 64 * 1024  # request line + headers; more is refused (400) before the body is read


@dataclass
class ServerState:
    client: EngineClient
    tokenizer: object
    model_name: str
    max_model_len: int
    vocab_size: int
    max_batch: int
    max_queue: int
    api_key: str | None
    metrics: Metrics
    draining: bool = False
    created: int = int(time.time())
    supervisor: object | None = None  # serve --restart: the Supervisor (restart counts for /health)
    spec: EngineSpec | None = None     # the served engine, as loaded (admin updates must match it)
    admin_enabled: bool = False        # serve --enable-admin: POST /admin/update_weights (serve/admin.py)
    weights_id: str | None = None      # the weights the ranks run (changed by an update)


# ---- prompts and parameters ---------------------------------------------------------------------------


def check_model(state: ServerState, name: str) -> None:
    if name != state.model_name:
        raise APIError(404, f"The model `{name}` does not exist; this server serves `{state.model_name}`.",
                       "model", "model_not_found")


def tokenize_prompt(state: ServerState, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, list):
        if not prompt:  # one empty entry of a batch, e.g. [[1, 2], []]
            raise APIError(400, "a prompt is an empty list of token ids", "prompt")
        bad = [t for t in prompt if not 0 <= t < state.vocab_size]
        if bad:
            raise APIError(400, f"prompt token ids must be in [0, {state.vocab_size}); got {bad[:5]}", "prompt")
        return list(prompt)
    if state.tokenizer is None:
        raise APIError(400, "this engine has no tokenizer: send token ids as the prompt", "prompt")
    ids = state.tokenizer(prompt)["input_ids"]
    if not ids:
        raise APIError(400, "the prompt is empty", "prompt")
    return list(ids)


def chat_prompt(state: ServerState, body: ChatCompletionRequest) -> list[int]:
    if state.tokenizer is None or not getattr(state.tokenizer, "chat_template", None):
        raise APIError(400, "this model has no chat template; use /v1/completions", "messages")
    try:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    except ValueError as exc:
        raise APIError(400, str(exc), "messages") from exc
    try:
        out = state.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)
    except Exception as exc:  # the template's own checks (jinja raise_exception), e.g. on the roles' order
        raise APIError(400, f"the model's chat template refuses these messages: {exc}", "messages") from exc
    return list(out["input_ids"])


def engine_request(state: ServerState, body: SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                   logprobs: int | None, prompt_logprobs: int | None = None) -> Request:
    room = state.max_model_len - len(prompt_ids)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        raise APIError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                       f"requested {len(prompt_ids) + (max_tokens or 1)} tokens ({len(prompt_ids)} in the prompt, "
                       f"{max_tokens or 1} for the completion). Reduce the prompt or max_tokens.", "max_tokens",
                       "context_length_exceeded")
    beam = body.beam_fields() if isinstance(body, CompletionRequest) else {}
    try:
        sampling = SamplingParams(beam.pop("temperature", body.temperature), max(body.top_k, 0), body.top_p, body.seed,
                                  logprobs, prompt_logprobs, **beam)
    except RequestError as exc:  # the engine's own checks, should the request models let a value through
        raise APIError(400, str(exc)) from exc
    return Request(prompt_ids, max_tokens or room, sampling, tuple(body.stop or ()), body.ignore_eos)


def admit(state: ServerState) -> None:
    """503 while draining, unhealthy, or with the queue full."""
    if state.draining or state.client.draining:
        raise APIError(503, "the server is shutting down", headers=RETRY_AFTER)
    if not state.client.healthy and not state.client.restarting:  # a restart: the request waits for it
        raise APIError(503, "the engine is not healthy", headers=RETRY_AFTER)
    if state.client.num_streams >= state.max_batch + state.max_queue:
        raise APIError(503, f"the request queue is full ({state.max_queue} waiting); retry later", headers=RETRY_AFTER)


# ---- generation -----------------------------------------------------------------------------------------


async def stream_request(state: ServerState, request: Request) -> AsyncIterator[RequestOutput]:
    timer = RequestTimer(state.metrics, len(request.prompt_ids))
    try:
        async for out in state.client.generate(request):
            timer.observe(out)
            yield out
    except RequestError as exc:
        raise APIError(400, str(exc)) from exc
    except (EngineDrainingError, EngineDeadError) as exc:
        raise APIError(503, str(exc), headers=RETRY_AFTER) from exc


@dataclass
class Collected:
    text: str
    token_ids: list[int]
    logprobs: list
    finish_reason: str | None
    prompt_tokens: int
    prompt_logprobs: list | None = None


async def collect(state: ServerState, request: Request) -> Collected:
    text, ids, lps, reason, prompt_lps = [], [], [], None, None
    async for out in stream_request(state, request):
        text.append(out.new_text)
        ids += out.new_token_ids
        lps += out.logprobs or []
        prompt_lps = out.prompt_logprobs if out.prompt_logprobs is not None else prompt_lps
        reason = out.finish_reason
    return Collected("".join(text), ids, lps, reason, len(request.prompt_ids), prompt_lps)


async def until_disconnect(http: HTTPRequest, coro):
    """Await `coro`, cancelling it (which aborts its engine requests) if the client goes away."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.5)
        if done:
            return task.result()
        if await http.is_disconnected():
            task.cancel()
            raise APIError(499, "client disconnected")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(state: ServerState, token_id: int) -> str:
    return state.tokenizer.decode([token_id]) if state.tokenizer is not None else str(token_id)


def completion_logprobs(state: ServerState, lps: list, offset: int, prompt_lps: list | None = None,
                        prompt_ids: list[int] | None = None) -> dict:
    """OpenAI's completions logprobs; with echo, the prompt's tokens first (the first has none)."""
    tokens = [token_text(state, lp.token_id) for lp in lps]
    token_lps = [lp.logprob for lp in lps]
    tops = [{token_text(state, i): v for i, v in lp.top} for lp in lps]
    offsets, start = [], offset
    if prompt_lps is not None and prompt_ids:
        prompt_tokens = [token_text(state, t) for t in prompt_ids]
        tokens = prompt_tokens + tokens
        token_lps = [None] + [lp.logprob for lp in prompt_lps] + token_lps
        tops = [None] + [{token_text(state, i): v for i, v in lp.top} for lp in prompt_lps] + tops
        start = 0
    for t in tokens:
        offsets.append(start)
        start += len(t)
    return {"tokens": tokens, "token_logprobs": token_lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(state: ServerState, lps: list) -> dict:
    def entry(token_id, logprob):
        text = token_text(state, token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


# ---- OpenAI routes ----------------------------------------------------------------------------------------


def completion_requests(state: ServerState, body: CompletionRequest) -> tuple[list[list[int]], list[Request]]:
    """(prompt ids, engine requests) of a completions body, or an APIError (4xx)."""
    check_model(state, body.model)
    prompts = [tokenize_prompt(state, p) for p in body.prompts()]
    # echo + logprobs: the prompt's own logprobs. max_tokens 0 (scoring only) runs one token and drops it.
    prompt_lps = body.logprobs if body.echo else None
    max_tokens = 16 if body.max_tokens is None else max(body.max_tokens, 1)
    return prompts, [engine_request(state, body, ids, max_tokens, body.logprobs, prompt_lps) for ids in prompts]


async def completions(state: ServerState, body: CompletionRequest, http: HTTPRequest):
    prompts, requests = completion_requests(state, body)
    admit(state)
    rid, echoes = f"cmpl-{uuid.uuid4().hex}", [_echo_text(state, body, p) for p in body.prompts()]
    if body.stream:
        return await sse_response(_completion_stream(state, body, rid, requests, echoes))
    results = await until_disconnect(http, asyncio.gather(*(collect(state, r) for r in requests)))
    if body.max_tokens == 0:
        results = [Collected("", [], [], "length", c.prompt_tokens, c.prompt_logprobs) for c in results]
    choices = [{"index": i, "text": echoes[i] + c.text, "finish_reason": c.finish_reason,
                "logprobs": None if body.logprobs is None else
                completion_logprobs(state, c.logprobs, len(echoes[i]), c.prompt_logprobs, prompts[i])}
               for i, c in enumerate(results)]
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name,
            "choices": choices, "usage": usage(sum(c.prompt_tokens for c in results),
                                                sum(len(c.token_ids) for c in results))}


def _echo_text(state: ServerState, body: CompletionRequest, prompt) -> str:
    if not body.echo:
        return ""
    return prompt if isinstance(prompt, str) else state.tokenizer.decode(prompt) if state.tokenizer else ""


async def _completion_stream(state, body, rid, requests, echoes) -> AsyncIterator[str]:
    base = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": state.model_name}
    offsets, prompt_tokens, completion_tokens = [len(e) for e in echoes], 0, 0
    scoring = body.max_tokens == 0  # echo only: the one token run to get there is not returned
    async for i, out in merge([stream_request(state, r) for r in requests]):
        first = out.num_output_tokens == len(out.new_token_ids)
        if scoring:
            out.new_text, out.logprobs, out.num_output_tokens, out.finish_reason = "", [], 0, "length"
        text = (echoes[i] if first else "") + out.new_text
        lps = None if body.logprobs is None else completion_logprobs(
            state, out.logprobs or [], offsets[i], out.prompt_logprobs if first else None, requests[i].prompt_ids)
        offsets[i] += len(out.new_text)
        yield sse({**base, "choices": [{"index": i, "text": text, "logprobs": lps,
                                        "finish_reason": out.finish_reason if out.finished else None}]})
        if out.finished:
            prompt_tokens += out.num_prompt_tokens
            completion_tokens += out.num_output_tokens
    if body.include_usage:
        yield sse({**base, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})


async def merge(streams: list[AsyncIterator]) -> AsyncIterator[tuple[int, object]]:
    """Interleave several async iterators, tagging items with their index; closing
    the merged iterator closes (and so aborts) every stream."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, stream):
        try:
            async for item in stream:
                await queue.put((i, item, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await queue.put((i, None, exc))
        await queue.put((i, None, StopAsyncIteration()))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        for _ in range(len(streams)):
            while True:
                i, item, exc = await queue.get()
                if isinstance(exc, StopAsyncIteration):
                    break
                if exc is not None:
                    raise exc
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


def chat_request(state: ServerState, body: ChatCompletionRequest) -> Request:
    """The engine request of a chat body, or an APIError (4xx)."""
    check_model(state, body.model)
    top = (body.top_logprobs or 0) if body.logprobs else None
    return engine_request(state, body, chat_prompt(state, body), body.output_limit, top)


async def chat_completions(state: ServerState, body: ChatCompletionRequest, http: HTTPRequest):
    request = chat_request(state, body)
    admit(state)
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    if body.stream:
        return await sse_response(_chat_stream(state, body, rid, request))
    c = await until_disconnect(http, collect(state, request))
    choice = {"index": 0, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
              "logprobs": chat_logprobs(state, c.logprobs) if body.logprobs else None}
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": state.model_name,
            "choices": [choice], "usage": usage(c.prompt_tokens, len(c.token_ids))}


async def _chat_stream(state, body, rid, request) -> AsyncIterator[str]:
    base = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": state.model_name}
    last = None
    async for out in stream_request(state, request):
        if last is None:  # after the engine took the request: a rejection is still a plain 4xx
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})
        last = out
        lps = chat_logprobs(state, out.logprobs or []) if body.logprobs else None
        delta = {"content": out.new_text} if out.new_text else {}
        yield sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": lps,
                                        "finish_reason": out.finish_reason if out.finished else None}]})
    if body.include_usage and last is not None:
        yield sse({**base, "choices": [], "usage": usage(last.num_prompt_tokens, last.num_output_tokens)})


async def sse_response(gen: AsyncIterator[str], done: bool = True) -> StreamingResponse:
    """Wait for the first event before answering, so that a rejected request is a
    plain 4xx/503; a failure later in the stream becomes an error event."""
    first = await anext(gen, None)

    async def body():
        try:
            if first is not None:
                yield first
            async for event in gen:
                yield event
        except APIError as exc:
            yield sse(exc.body())
        finally:
            await gen.aclose()
        if done:
            yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


# ---- Triton generate extension ------------------------------------------------------------------------------


def triton_request(state: ServerState, name: str, body: TritonGenerateRequest) -> Request:
    check_model(state, name)
    p = body.parameters
    try:
        fields = SamplingFields(model=name, max_tokens=p.get("max_tokens", body.max_tokens),
                                temperature=p.get("temperature", 0.0), top_p=p.get("top_p", 1.0),
                                top_k=p.get("top_k", 0), seed=p.get("seed", p.get("random_seed")),
                                stop=p.get("stop") or None, ignore_eos=bool(p.get("ignore_eos", False)))
    except ValueError as exc:
        raise APIError(400, f"parameters: {exc}", "parameters") from exc
    return engine_request(state, fields, tokenize_prompt(state, body.text_input), fields.max_tokens, None)


async def triton_stream(state: ServerState, name: str, request: Request) -> AsyncIterator[str]:
    async for out in stream_request(state, request):
        if out.new_text or out.finished:
            yield sse({"model_name": name, "model_version": "1", "text_output": out.new_text})


# ---- the app -----------------------------------------------------------------------------------------------


def build_app(state: ServerState, limits: HttpLimits = HttpLimits()) -> FastAPI:
    app = FastAPI(title="dist_infer", version=dist_infer.__version__)
    _install_error_handlers(app)
    _install_auth(app, state)
    app.add_middleware(BodySizeLimit, max_bytes=limits.max_body_bytes, error_body=error_json)

    @app.get("/health")
    async def health():
        if state.client.restarting:  # 503 so that load balancers route away; requests still wait here
            return JSONResponse(restarting_body(state), status_code=503, headers=RETRY_AFTER)
        ok = state.client.healthy and not (state.draining or state.client.draining)
        return Response(status_code=200 if ok else 503)

    @app.get("/version")
    async def version():
        return {"version": dist_infer.__version__}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(state.client.stats), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "dist_infer", "max_model_len": state.max_model_len,
                                            "weights_id": state.weights_id}]}

    @app.post("/v1/completions")
    async def v1_completions(body: CompletionRequest, http: HTTPRequest):
        return await completions(state, body, http)

    @app.post("/v1/chat/completions")
    async def v1_chat(body: ChatCompletionRequest, http: HTTPRequest):
        return await chat_completions(state, body, http)

    _install_triton_routes(app, state)
    install_admin_routes(app, state)
    return app


def restarting_body(state: ServerState) -> dict:
    sup = state.supervisor
    return {"status": "restarting", "message": "the engine is restarting; requests are accepted and wait for it",
            "restart": getattr(sup, "used", None), "max_restarts": getattr(getattr(sup, "policy", None),
                                                                           "restarts", None),
            "waiting_requests": state.client.num_streams}


def _install_triton_routes(app: FastAPI, state: ServerState) -> None:
    @app.get("/v2/health/live")
    async def live():
        return Response(status_code=200)

    @app.get("/v2/health/ready")
    async def ready():
        return Response(status_code=200 if state.client.healthy and not state.draining else 503)

    @app.get("/v2/models/{name}")
    async def model_metadata(name: str):
        check_model(state, name)
        return {"name": name, "versions": ["1"], "platform": "dist_infer",
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1]},
                           {"name": "max_tokens", "datatype": "INT32", "shape": [1]}],
                "outputs": [{"name": "text_output", "datatype": "BYTES", "shape": [1]}]}

    @app.post("/v2/models/{name}/generate")
    async def generate(name: str, body: TritonGenerateRequest, http: HTTPRequest):
        request = triton_request(state, name, body)
        admit(state)
        c = await until_disconnect(http, collect(state, request))
        return {"model_name": name, "model_version": "1", "text_output": c.text}

    @app.post("/v2/models/{name}/generate_stream")
    async def generate_stream(name: str, body: TritonGenerateRequest):
        request = triton_request(state, name, body)
        admit(state)
        return await sse_response(triton_stream(state, name, request), done=False)


def error_json(status: int, message: str) -> bytes:
    return json.dumps(APIError(status, message).body()).encode()


def uvicorn_limits(limits: HttpLimits) -> dict:
    """uvicorn.Config's arguments for the limits (serve/limits.py says why each)."""
    return dict(http=deadline_protocol(limits.read_timeout_s), timeout_keep_alive=limits.keep_alive_s,
                limit_concurrency=limits.connections_that_fit(), h11_max_incomplete_event_size=MAX_HEADER_BYTES)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_, exc: APIError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        elif loc == [] and first.get("type") in ("model_attributes_type", "dict_type", "missing"):
            message = "the request body must be a JSON object (send Content-Type: application/json)"
        param = ".".join(loc) or None
        return JSONResponse(APIError(400, f"{param + ': ' if param else ''}{message}", param).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(_, exc: Exception):  # a bug of ours: logged, and still an OpenAI-shaped body
        log.exception("unexpected failure")
        return JSONResponse(APIError(500, f"internal error: {type(exc).__name__}").body(), status_code=500)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        return JSONResponse(APIError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


def _install_auth(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def check_key(http: HTTPRequest, call_next):
        if state.api_key and http.url.path.startswith(("/v1/", "/v2/models", "/admin/")):
            if http.headers.get("authorization", "") != f"Bearer {state.api_key}":
                return JSONResponse(APIError(401, "missing or wrong API key: send `Authorization: Bearer KEY`",
                                             code="invalid_api_key").body(), status_code=401)
        return await call_next(http)


# ---- the process ---------------------------------------------------------------------------------------------


class DrainingServer(uvicorn.Server):
    """First signal: drain (503 for new requests, running ones finish); second: exit.
    Either way /health answers 503 for `linger_s` before the port closes, so a load
    balancer sees the server go unhealthy rather than vanish."""

    linger_s = 1.5

    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float):
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout

    def handle_exit(self, sig, frame) -> None:
        if self.state.draining:
            asyncio.get_event_loop().call_later(self.linger_s, setattr, self, "should_exit", True)
            return
        log.info("draining: new requests get 503; waiting up to %.0f s for %d running", self.shutdown_timeout,
                 self.state.client.num_streams)
        self.state.draining = True
        self.state.client.drain(self.shutdown_timeout)
        if self.state.supervisor is not None:
            self.state.supervisor.drain()
        asyncio.get_event_loop().create_task(self._exit_when_idle())

    def exit_after_linger(self) -> None:
        """The engine is gone for good (or drained by itself): /health 503 a moment, then exit."""
        self.state.draining = True
        asyncio.get_event_loop().call_later(self.linger_s, setattr, self, "should_exit", True)

    async def _exit_when_idle(self) -> None:
        deadline = time.monotonic() + self.shutdown_timeout + 5
        while self.state.client.num_streams and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(self.linger_s)
        self.should_exit = True


def watch_parent(state: ServerState, grace_s: float = 2.0) -> None:
    """Rank 0 is our parent: if it dies (killed with its job), report 503 briefly, then exit 1."""
    parent, event_loop = os.getppid(), asyncio.get_running_loop()

    def loop():
        while os.getppid() == parent:
            time.sleep(0.2)
        event_loop.call_soon_threadsafe(state.client.engine_died, "rank 0 exited")
        log.error("rank 0 (pid %d) is gone: the engine is down; exiting", parent)
        time.sleep(grace_s)
        os._exit(1)

    threading.Thread(target=loop, daemon=True, name="parent-watch").start()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="dist_infer.serve.api_server")
    p.add_argument("--engine", required=True)
    p.add_argument("--ipc-dir", help="rank 0's engine sockets (not with serve --restart: they are bound here)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name")
    p.add_argument("--max-queue", type=int, default=1024)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--enable-admin", action="store_true", help="POST /admin/update_weights (serve/admin.py)")
    return p.parse_args(argv)


async def serve_http(args: argparse.Namespace) -> int:
    """The front-end as rank 0's child: rank 0 bound the engine sockets in --ipc-dir."""
    tokenizer = load_tokenizer(Path(args.engine))
    client = AdminEngineClient(EngineAddresses.in_directory(Path(args.ipc_dir)), tokenizer)
    await client.start()
    state = server_state(args, client, tokenizer)
    watch_parent(state)
    await client.wait_ready(timeout_s=60)
    server = http_server(args, state)
    await server.serve()
    await client.close()
    return 0 if server.started else 2


def server_state(args: argparse.Namespace, client: EngineClient, tokenizer) -> ServerState:
    spec = EngineSpec.read(Path(args.engine))
    return ServerState(client, tokenizer, args.served_model_name or Path(args.engine).resolve().name,
                       spec.build.max_seq_len, spec.model.vocab_size, spec.build.max_batch_size, args.max_queue,
                       os.environ.get("DIST_INFER_API_KEY") or None, Metrics(args.served_model_name or "engine"),
                       spec=spec, admin_enabled=args.enable_admin, weights_id=spec.weights_id)


def http_server(args: argparse.Namespace, state: ServerState) -> DrainingServer:
    limits = HttpLimits.from_env()
    config = uvicorn.Config(build_app(state, limits), host=args.host, port=args.port, log_level="warning",
                            timeout_graceful_shutdown=5, **uvicorn_limits(limits))
    return DrainingServer(config, state, args.shutdown_timeout)


async def serve_supervised(args: argparse.Namespace, start_job, policy, control_host: str) -> int:
    """`serve --restart N`: this process binds the engine sockets and serves HTTP; the
    Supervisor runs the rank job (start_job) and restarts it when it fails."""
    from dist_infer.serve.supervisor import FirstStartFailed, Supervisor

    tokenizer = load_tokenizer(Path(args.engine))
    client = AdminEngineClient(None, tokenizer)
    await client.start()
    state = server_state(args, client, tokenizer)
    state.supervisor = supervisor = Supervisor(client, start_job, control_host, policy)
    try:
        await supervisor.start()
    except FirstStartFailed as exc:
        log.error("%s: the server does not start (restarts are for an engine that served)", exc)
        await client.close()
        return exc.code
    server = http_server(args, state)
    watch = asyncio.create_task(_supervise(supervisor, server))
    await server.serve()
    await supervisor.finish(timeout_s=args.shutdown_timeout + 15)
    done, _ = await asyncio.wait({watch}, timeout=5)  # the verdict follows the job's end
    await client.close()
    code = watch.result() if done else 0
    return code if server.started else 2


async def _supervise(supervisor, server: DrainingServer) -> int:
    """The supervisor's verdict ends the HTTP server: 1 (no restart left), 2 (the engine cannot
    restart: bad input such as a corrupted engine file) or 0 (the job ended on purpose)."""
    code = await supervisor.run()
    if code:
        log.error("the engine is down for good: /health answers 503; exiting %d", code)
    else:
        log.info("the rank job ended (exit code 0, drained): stopping the front-end")
    server.exit_after_linger()
    return code


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from dist_infer.log import setup_logging

    setup_logging(args.log_level, rank=0)
    try:
        return asyncio.run(serve_http(args))
    except EngineDeadError as exc:
        log.error("%s", exc)
        return 1


if __name__ == "__main__":
    sys.exit(main())
