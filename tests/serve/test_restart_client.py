"""Resuming requests across an engine restart, in process and in milliseconds: the
EngineClient against scripted engines on real ZeroMQ sockets, and the sampler's
seeded stream resumed at a token index."""

from __future__ import annotations

import asyncio

import pytest
import torch
import zmq
import zmq.asyncio

from dist_infer.client import EngineClient, EngineDeadError
from dist_infer.engine.sampling import Sampler, SamplingParams
from dist_infer.workers.engine_loop import FrameSigner, engine_key
from dist_infer.workers.llm_engine import EngineStats, Request, RequestOutput

STATS = EngineStats(0, 0, 0.0, 0.0, 0, 0)


class ScriptedEngine:
    """Rank 0's side of the sockets, as `serve --engine-only --connect` opens them."""

    def __init__(self, ctx: zmq.asyncio.Context, addresses):
        self.signer = FrameSigner(engine_key(addresses, create=False), "scripted engine")  # the key rank 0 inherits
        self.inbox = ctx.socket(zmq.PULL)
        self.inbox.connect(addresses.requests)
        self.outbox = ctx.socket(zmq.PUSH)
        self.outbox.connect(addresses.outputs)
        self.beating = asyncio.create_task(self._heartbeats())

    async def _heartbeats(self) -> None:
        while True:  # as the engine loop does, twice a second (faster here)
            await self.outbox.send(self.signer.seal(("heartbeat", STATS, False)))
            await asyncio.sleep(0.05)

    async def next_add(self) -> tuple[str, Request]:
        while True:
            message = self.signer.open(await asyncio.wait_for(self.inbox.recv(), 10))
            if message[0] == "add":
                return message[1], message[2]

    async def tokens(self, request_id: str, tokens: list[int], done_before: int, last: bool) -> None:
        for i, token in enumerate(tokens):
            finished = last and i == len(tokens) - 1
            out = RequestOutput(request_id, [token], "", finished, "length" if finished else None, 3,
                                done_before + i + 1)
            await self.outbox.send(self.signer.seal(("outputs", [out])))

    def die(self) -> None:
        self.beating.cancel()
        self.inbox.close(linger=0)
        self.outbox.close(linger=0)


async def _consume(client: EngineClient, request: Request, got: list[RequestOutput]) -> None:
    async for out in client.generate(request, request_id="r1"):
        got.append(out)


def test_an_unfinished_request_resumes_on_the_next_engine_where_it_stopped():
    """Engine 1 sends 4 of 10 tokens and dies; engine 2 gets prompt + those 4, 6 tokens to go and
    the seeded stream's position; the caller sees 10 tokens in order, counted as one request."""
    async def scenario():
        client = EngineClient(None)
        await client.start()
        ctx = zmq.asyncio.Context()
        request = Request([7, 8, 9], 10, SamplingParams(temperature=0.7, seed=42, prompt_logprobs=1))
        got: list[RequestOutput] = []
        first = ScriptedEngine(ctx, client.bind("127.0.0.1"))
        caller = asyncio.create_task(_consume(client, request, got))
        rid, sent = await first.next_add()
        assert sent.prompt_ids == [7, 8, 9] and sent.max_new_tokens == 10 and sent.sampling.resume_at == 0
        await first.tokens(rid, [100, 101, 102, 103], 0, last=False)
        await _until(lambda: len(got) == 4)
        first.die()
        client.engine_lost()
        assert client.restarting and not client.healthy
        second = ScriptedEngine(ctx, client.bind("127.0.0.1"))
        rid, resumed = await second.next_add()
        assert resumed.prompt_ids == [7, 8, 9, 100, 101, 102, 103] and resumed.max_new_tokens == 6
        assert resumed.sampling.resume_at == 4 and resumed.sampling.seed == 42
        assert resumed.sampling.prompt_logprobs is None  # they went out with the first token
        await second.tokens(rid, [104, 105, 106, 107, 108, 109], 0, last=True)
        await asyncio.wait_for(caller, 10)
        second.die()
        await client.close()
        ctx.term()
        return got

    got = asyncio.run(scenario())
    assert [t for out in got for t in out.new_token_ids] == list(range(100, 110))
    assert [out.num_output_tokens for out in got] == list(range(1, 11))
    assert {out.num_prompt_tokens for out in got} == {3} and got[-1].finished


def test_requests_wait_during_a_restart_and_fail_when_it_is_given_up():
    """A request accepted while no engine is there is sent to the next one; if the supervisor
    gives up instead (no restart left), the waiting caller gets the engine's death."""
    async def scenario():
        client = EngineClient(None)
        await client.start()
        ctx = zmq.asyncio.Context()
        client.bind("127.0.0.1")
        client.engine_lost()
        got: list[RequestOutput] = []
        waiting = asyncio.create_task(_consume(client, Request([1, 2], 2), got))
        await asyncio.sleep(0.2)
        assert not waiting.done() and client.num_streams == 1
        engine = ScriptedEngine(ctx, client.bind("127.0.0.1"))
        rid, sent = await engine.next_add()
        assert sent.prompt_ids == [1, 2]
        await engine.tokens(rid, [5, 6], 0, last=True)
        await asyncio.wait_for(waiting, 10)
        engine.die()
        client.engine_lost()
        doomed = asyncio.create_task(_consume(client, Request([3], 2), []))
        await asyncio.sleep(0.1)
        client.engine_died("no restart left")
        with pytest.raises(EngineDeadError, match="no restart left"):
            await asyncio.wait_for(doomed, 10)
        await client.close()
        ctx.term()
        return got

    got = asyncio.run(scenario())
    assert [t for out in got for t in out.new_token_ids] == [5, 6]


async def _until(condition, timeout: float = 10) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_seeded_stream_resumed_at_a_token_index_draws_the_same_tokens():
    """Token i of a seeded request uses draw i of its stream: a sampler that starts at i
    (a resumed request) samples what the uninterrupted one sampled from there on."""
    torch.manual_seed(0)
    logits = [torch.randn(1, 50) for _ in range(12)]
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234)
    whole = Sampler()
    whole.add(0, params)
    want = [whole(step, [0]).item() for step in logits]
    resumed = Sampler()
    resumed.add(0, SamplingParams(temperature=1.0, top_p=0.9, seed=1234, resume_at=5))
    assert [resumed(step, [0]).item() for step in logits[5:]] == want[5:]
    fresh = Sampler()
    fresh.add(0, params)  # starting over instead would repeat the first draws
    assert [fresh(step, [0]).item() for step in logits[5:]] != want[5:]


def test_a_lost_engine_that_was_draining_does_not_turn_requests_away_during_the_restart():
    """When one rank dies, the launcher SIGTERMs the others, and rank 0 may report "draining" in a last
    heartbeat before the job is known lost. Requests sent during the restart must still wait for the next
    engine, not get 503 "the server is shutting down" (seen in the mpirun fault drill under load)."""
    async def scenario():
        client = EngineClient(None)
        await client.start()
        ctx = zmq.asyncio.Context()
        first = ScriptedEngine(ctx, client.bind("127.0.0.1"))
        await _until(lambda: client.ready)
        first.beating.cancel()
        await first.outbox.send(first.signer.seal(("heartbeat", STATS, True)))  # SIGTERMed: draining
        await _until(lambda: client.draining)
        first.die()
        client.engine_lost()
        assert client.restarting and not client.draining
        got: list[RequestOutput] = []
        caller = asyncio.create_task(_consume(client, Request([1, 2], 2, SamplingParams()), got))
        second = ScriptedEngine(ctx, client.bind("127.0.0.1"))
        rid, _ = await second.next_add()
        await second.tokens(rid, [5, 6], 0, last=True)
        await asyncio.wait_for(caller, 10)
        assert [o.new_token_ids for o in got] == [[5], [6]]
        second.die()
        await client.close()
        ctx.term()

    asyncio.run(scenario())
