"""Live weight refit: `mpirun -n 2 dist-infer serve --enable-admin` takes new weights on
POST /admin/update_weights between steps, while the official openai client streams run.

The server starts on a TP=2 engine of tiny Llama A. Bad bodies (a typo, no such directory, a
partitioned checkpoint, an engine whose rank-1 file is corrupt: only rank 1 can tell) are 400 and
the server goes on answering with A's weights on both ranks. Then the served engine is refitted in
place with checkpoint B (`refit`), the update is posted while streams run: every stream finishes,
and afterwards greedy answers are B's (transformers' greedy tokens of B, decoded). Without
--enable-admin the route is 403 and names the flag.
"""

from __future__ import annotations

import asyncio
import shutil
import signal

import httpx
import openai
import pytest

from conftest import flip_middle_bytes, hf_greedy, make_tiny_model
from dist_infer.engine.refit import refit
from dist_infer.engine.runtime import EngineSpec
from .server import Server

pytestmark = pytest.mark.timeout(300)
PROMPTS = [[5, 17, 42, 7, 99], [200, 3, 250, 9, 11, 64, 2]]
NEW = 8
STREAMS = 8       # the engine's max batch: all decode together
STREAM_TOKENS = 30


@pytest.fixture(scope="module")
def setup(tiny, tmp_path_factory, tokenizer):
    """(served engine: a copy of tiny's TP=2 engine of A, checkpoint B with the same tokenizer, model A, model B)."""
    engine, model_a = tiny
    root = tmp_path_factory.mktemp("admin-refit")
    served = root / "served"
    shutil.copytree(engine(2, 1), served)
    model_b = make_tiny_model(root / "B", "llama", seed=1)
    for f in engine(2, 1).glob("tokenizer*"):
        shutil.copy(f, root / "B" / f.name)
    return served, root / "B", model_a, model_b


def greedy_texts(url: str, tokenizer) -> list[str]:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
    answer = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=NEW, temperature=0,
                                       extra_body={"ignore_eos": True})
    return [c.text for c in sorted(answer.choices, key=lambda c: c.index)]


def reference(model, tokenizer) -> list[str]:
    return [tokenizer.decode(hf_greedy(model, p, NEW), skip_special_tokens=True) for p in PROMPTS]


def update(url: str, body: dict) -> httpx.Response:
    return httpx.post(f"{url}/admin/update_weights", json=body, timeout=120)


def weights_id(url: str) -> str:
    return httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["weights_id"]


async def streams_across_an_update(url: str, served) -> tuple[list[tuple[str, str]], dict]:
    """STREAMS streaming completions; the update is posted once every stream has its first token."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    started = [asyncio.Event() for _ in range(STREAMS)]

    async def one(i: int) -> tuple[str, str]:
        chunks = await client.completions.create(model="tiny", prompt=[3 + i, 50, 7], max_tokens=STREAM_TOKENS,
                                                 temperature=0, stream=True, extra_body={"ignore_eos": True})
        text, reason = "", None
        async for c in chunks:
            started[i].set()
            text += c.choices[0].text
            reason = c.choices[0].finish_reason or reason
        return text, reason

    async def post_update() -> dict:
        await asyncio.gather(*(e.wait() for e in started))  # every stream is decoding
        async with httpx.AsyncClient(timeout=120) as http:
            r = await http.post(f"{url}/admin/update_weights", json={"engine": str(served)})
        assert r.status_code == 200, r.text
        return r.json()

    *results, answer = await asyncio.gather(*(one(i) for i in range(STREAMS)), post_update())
    return results, answer


def test_live_update_while_streams_run(setup, tokenizer, tmp_path):
    served, checkpoint_b, model_a, model_b = setup
    srv = Server(served, 2, "--served-model-name", "tiny", "--enable-admin").wait_healthy()
    try:
        old_id = weights_id(srv.url)
        assert old_id == EngineSpec.read(served).weights_id
        want_a = reference(model_a, tokenizer)
        assert greedy_texts(srv.url, tokenizer) == want_a

        corrupt = tmp_path / "corrupt"
        shutil.copytree(served, corrupt)
        flip_middle_bytes(corrupt / "rank1" / "weights.safetensors")  # only rank 1 reads it
        (tmp_path / "damaged").mkdir()
        (tmp_path / "damaged" / "engine.json").write_text('{"format": "dist_infer-engine", "format_version": 1}')
        bad = {"typo": ({"enigne": str(served)}, "enigne"),
               "damaged engine.json": ({"engine": str(tmp_path / "damaged")}, "is damaged"),
               "missing": ({"engine": str(tmp_path / "nowhere")}, "not a dist_infer engine"),
               "checkpoint": ({"engine": str(checkpoint_b)}, "not a dist_infer engine"),
               "corrupt rank 1": ({"engine": str(corrupt)}, "rank 1")}
        for case, (body, expected) in bad.items():
            r = update(srv.url, body)
            assert r.status_code == 400 and expected in r.json()["error"]["message"], (case, r.text)
        assert "every rank kept" in update(srv.url, {"engine": str(corrupt)}).json()["error"]["message"]
        assert greedy_texts(srv.url, tokenizer) == want_a  # both ranks still on A
        assert weights_id(srv.url) == old_id

        result = refit(served, checkpoint_b)  # in place, while the server runs from it
        assert greedy_texts(srv.url, tokenizer) == want_a  # a refit alone changes nothing live
        results, answer = asyncio.run(streams_across_an_update(srv.url, served))
        assert answer["weights_id"] == result.weights_id != old_id and answer["seconds"] > 0
        assert answer["running_requests"] > 0  # the update landed while streams were unfinished
        assert all(reason == "length" and text for text, reason in results), results

        assert greedy_texts(srv.url, tokenizer) == reference(model_b, tokenizer)
        assert weights_id(srv.url) == result.weights_id
        assert srv.health() == 200
        assert srv.stop(signal.SIGTERM, 60, pid=srv.rank_pid(0)) == 0, srv.output()  # drains and exits
    finally:
        srv.kill()


def test_without_enable_admin_the_route_is_refused(tmp_path):
    """The front-end's app (no engine needed: the route refuses before it asks one) as `serve`
    without --enable-admin builds it."""
    from fastapi.testclient import TestClient

    from dist_infer.serve.api_server import ServerState, build_app

    state = ServerState(None, None, "tiny", 128, 301, 8, 8, None, None)
    with TestClient(build_app(state)) as http:
        r = http.post("/admin/update_weights", json={"engine": str(tmp_path)})
        assert r.status_code == 403 and "--enable-admin" in r.json()["error"]["message"]
        assert http.post("/admin/update_weights", content=b"{").status_code == 400
