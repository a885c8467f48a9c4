"""The front-end's admin route (off unless `serve --enable-admin`): live weight updates.

    POST /admin/update_weights  {"engine": "DIR"}

DIR is an engine refitted with new weights (`dist-infer refit --engine DIR --checkpoint NEW`):
the served engine itself, refitted in place, or a refitted copy of it. The front-end checks
that DIR is a build of the served model (same model config, layout, build options; every rank
file present) and answers 400 otherwise, before any rank reads a byte. Rank 0's engine loop
then takes the update between two steps: the step in flight finishes, every rank stages its new
rank file in host memory and checks it (names, shapes, dtypes, sha256 pieces), and only when all
ranks have, each copies it into its parameters in place (CUDA graphs stay valid). A rank that
cannot stage fails the update on every rank (400, old weights everywhere). Running requests
continue on the new weights; the prefix cache is dropped. 200 once every rank runs them, with
the seconds taken and the new weights id (also in /v1/models).

Under `serve --restart N` a restarted rank job loads the served engine directory, so there DIR
must be the served engine refitted in place (else a restart would bring the old weights back).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import asdict
from pathlib import Path

from fastapi import FastAPI

from dist_infer.client import EngineClient, EngineDeadError
from dist_infer.engine.runtime import EngineSpec
from dist_infer.errors import DistInferError
from dist_infer.serve.protocol import APIError, UpdateWeightsRequest

log = logging.getLogger("dist_infer.serve")

UPDATE_TIMEOUT_S = 600.0  # reading and hashing every rank's file of a large model takes a while


class AdminEngineClient(EngineClient):
    """The engine client with the weight-update round trip: ("update_weights", id, dir) to rank
    0's loop, ("weights", id, WeightsUpdated | None, error | None) back."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._updates: dict[str, asyncio.Future] = {}

    async def update_weights(self, directory: str):
        """The engine's WeightsUpdated; DistInferError with the ranks' reason when refused."""
        update_id = uuid.uuid4().hex
        answer = self._updates[update_id] = asyncio.get_running_loop().create_future()
        try:
            if self.dead_reason or not self._send(("update_weights", update_id, directory)):
                raise EngineDeadError(self.dead_reason or "no engine is connected (it is restarting)")
            done, error = await asyncio.wait_for(answer, UPDATE_TIMEOUT_S)
        finally:
            self._updates.pop(update_id, None)
        if error is not None:
            raise DistInferError(error)
        return done

    def _dispatch(self, message: tuple) -> None:
        if message[0] != "weights":
            super()._dispatch(message)
        elif (answer := self._updates.get(message[1])) is not None and not answer.done():
            answer.set_result((message[2], message[3]))

    def _fail_updates(self, reason: str) -> None:
        for answer in self._updates.values():
            if not answer.done():
                answer.set_exception(EngineDeadError(reason))

    def engine_died(self, reason: str) -> None:
        self._fail_updates(reason)
        super().engine_died(reason)

    def engine_lost(self) -> None:
        self._fail_updates("the engine was lost during the update and restarts from the served engine directory")
        super().engine_lost()


def check_update(served: EngineSpec, directory: str, supervised: bool) -> Path:
    """400 unless `directory` is a complete build of the served model (nothing is sent to the ranks)."""
    path = Path(directory)
    try:
        spec = EngineSpec.read_checked(path)
    except DistInferError as exc:
        raise APIError(400, str(exc), "engine") from None
    differences = served.differences(spec)
    if differences:
        raise APIError(400, f"{path} is not a build of the served model ({', '.join(differences)} differ). Refit the "
                            f"served engine instead: `dist-infer refit --engine {served.directory} --checkpoint NEW`, "
                            "then post its directory.", "engine")
    missing = [name for name in spec.files if not (path / name).is_file()]
    if missing:
        raise APIError(400, f"{path} lacks {', '.join(missing[:3])}: the engine is incomplete. Refit it again.",
                       "engine")
    if supervised and path.resolve() != served.directory.resolve():
        raise APIError(400, f"under serve --restart a restarted engine loads {served.directory}, so update from that "
                            f"directory itself: `dist-infer refit --engine {served.directory} --checkpoint NEW`, then "
                            f"post {{\"engine\": \"{served.directory}\"}}.", "engine")
    return path


def install_admin_routes(app: FastAPI, state) -> None:
    """The routes exist either way: without --enable-admin they answer 403 and say how to enable them."""
    lock = asyncio.Lock()  # one update at a time; the next waits for it

    @app.post("/admin/update_weights")
    async def update_weights(body: UpdateWeightsRequest):
        if not state.admin_enabled:
            raise APIError(403, "the admin endpoints are off: start the server with `dist-infer serve --enable-admin "
                                "...` to update weights live")
        path = check_update(state.spec, body.engine, state.supervisor is not None)
        async with lock:
            return await _update(state, path)


async def _update(state, path: Path) -> dict:
    client: AdminEngineClient = state.client
    try:
        done = await client.update_weights(str(path))
    except asyncio.TimeoutError:
        raise APIError(504, f"the engine did not finish the weight update within {UPDATE_TIMEOUT_S:.0f} s") from None
    except EngineDeadError as exc:
        raise APIError(503, f"the weight update did not complete: {exc}") from None
    except DistInferError as exc:  # refused on the ranks (a corrupt file, say): every rank kept the old weights
        raise APIError(400, f"{exc} (every rank kept the weights it had)", "engine") from None
    state.weights_id = done.weights_id
    log.info("weights updated from %s in %.2f s: %s", path, done.seconds, done.weights_id)
    return {"status": "ok", **asdict(done), "running_requests": client.num_streams}
