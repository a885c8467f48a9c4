"""Ray driver: one placement-group bundle and one actor per rank.

    python -m dist_infer.launchers.ray_driver [--address HEAD:6379] -- run --engine E --prompt Hi

Runs as the entrypoint of `ray job submit` (the job sets RAY_ADDRESS) or as a
driver started by `dist-infer launch` against a running cluster. Each pipeline
stage is a STRICT_PACK placement group of TP bundles (a TP group stays on one
node; stages may land on different nodes). The driver only starts the ranks
and collects the ranks' output (stdout, then each rank's log on stderr, when
they finish; live logs are in the actors' Ray log files): per-step control
flows over the ranks' gloo world exactly as under mpirun.

`-- serve --restart N`: the driver runs the HTTP front-end and its supervisor
(dist_infer/serve/supervisor.py) itself; each incarnation of the rank job is a
fresh set of rank actors in the same placement groups, running `serve
--engine-only --connect` back to the driver's node. When a rank's actor dies
or ends with an error, the others are killed and new ones start.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from dist_infer.config import Mapping
from dist_infer.engine.kernel_compile import MAX_WORKERS, WORKERS_ENV
from dist_infer.errors import DistInferError, LaunchError

log = logging.getLogger("dist_infer.ray")

PLACEMENT_TIMEOUT_S = 120
START_TIMEOUT_S = 300
FAILURE_GRACE_S = 15  # after one rank fails, how long the others get to finish (collective errors)


def run_on_ray(args: list[str], tp: int, pp: int, address: str | None = None, cpus_per_rank: float = 1,
               gpus_per_rank: float = 0, env: dict[str, str] | None = None, timeout: float | None = None) -> int:
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    from dist_infer.launchers.commands import restarts, serve_address

    try:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise LaunchError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS/auto'}: {exc}. Start one with "
                          "`ray start --head` or point ray.address at its head.") from None
    pgs, actors = [], []
    try:
        bundle = {"CPU": cpus_per_rank, **({"GPU": gpus_per_rank} if gpus_per_rank else {})}
        pgs = [placement_group([dict(bundle) for _ in range(tp)], strategy="STRICT_PACK") for _ in range(pp)]
        ready, _ = ray.wait([pg.ready() for pg in pgs], num_returns=len(pgs), timeout=PLACEMENT_TIMEOUT_S)
        if len(ready) < len(pgs):
            nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
            raise LaunchError(
                f"the Ray cluster cannot place {pp} pipeline stage(s) of {tp} rank(s) (each stage on one node, "
                f"{bundle} per rank) within {PLACEMENT_TIMEOUT_S}s; alive nodes have {nodes}. Add nodes, CPUs or "
                "GPUs, or lower ray.cpus_per_rank.")
        ranks = RankActors(ray, pgs, tp, pp, {"num_cpus": cpus_per_rank, "num_gpus": gpus_per_rank},
                           rank_env(env or {}, cpus_per_rank))
        if restarts(args):
            return supervise_on_ray(ray, args, ranks)
        actors = ranks.create()
        master, nodes = ranks.started(actors)
        serve = serve_address(args)
        if serve:  # rank 0's actor runs the server: only now is its node known
            log.info("dist_infer: serving at http://%s:%d", serve[0] or nodes[0], serve[1])
            timeout = None  # a server runs until it is drained, not for ray.timeout_s
        codes, outputs, logs = _wait(ray, actors, [a.run.remote(list(args), *master) for a in actors], timeout)
    finally:
        for a in actors:
            ray.kill(a)
        for pg in pgs:
            remove_placement_group(pg)
        ray.shutdown()
    for rank in sorted(logs):
        sys.stderr.write(logs[rank])
    sys.stderr.flush()
    for rank in sorted(outputs):
        sys.stdout.write(outputs[rank])
    sys.stdout.flush()
    failed = {r: c for r, c in codes.items() if c != 0}
    return codes.get(0) or (next(iter(failed.values())) if failed else 0)


def rank_env(env: dict[str, str], cpus_per_rank: float) -> dict[str, str]:
    """Every rank actor's environment: the user's, and as many Triton compile workers as the CPUs
    the actor holds, unless the user set that. Ray pins no CPUs and shows each actor one GPU, so a
    rank cannot tell how many others share its node's cores."""
    return {WORKERS_ENV: str(max(1, min(MAX_WORKERS, int(cpus_per_rank)))), **env}


class RankActors:
    """Creates one incarnation of the rank actors in the job's placement groups (the same
    groups each time: a restart needs no new placement)."""

    def __init__(self, ray, pgs: list, tp: int, pp: int, resources: dict, env: dict[str, str]):
        from dist_infer.launchers.ray_actors import RankActor

        self.ray, self.pgs, self.tp, self.pp, self.resources, self.env = ray, pgs, tp, pp, resources, env
        self.actor_cls = ray.remote(RankActor)

    def create(self) -> list:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actors = []
        for rank in range(self.tp * self.pp):
            m = Mapping(self.tp, self.pp, rank)
            strategy = PlacementGroupSchedulingStrategy(self.pgs[m.pp_rank], placement_group_bundle_index=m.tp_rank)
            actors.append(self.actor_cls.options(**self.resources, scheduling_strategy=strategy, max_restarts=0)
                          .remote(rank, self.tp * self.pp, dict(self.env)))
        return actors

    def started(self, actors: list) -> tuple[tuple[str, int], list[str]]:
        """(rank 0's gloo endpoint, each rank's node), once every actor runs."""
        ray = self.ray
        try:
            master = ray.get(actors[0].endpoint.remote(), timeout=START_TIMEOUT_S)
            nodes = ray.get([a.node.remote() for a in actors], timeout=START_TIMEOUT_S)
            pids = ray.get([a.pid.remote() for a in actors], timeout=START_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as exc:  # GetTimeoutError is a TimeoutError
            raise LaunchError(f"the rank actors did not start: {exc}") from None
        log.info("ranks on nodes %s, pids %s; gloo world at %s:%d", nodes, pids, *master)
        return master, nodes


def _wait(ray, actors, refs, timeout: float | None):
    """Every rank's (exit code, stdout). When one rank fails the others get a
    grace period (a collective error ends them all), then the job is killed."""
    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    codes, outputs, logs = {}, {}, {}
    pending = list(refs)
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending:
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        done, pending = ray.wait(pending, num_returns=1, timeout=left)
        if not done:
            failing = "timed out" if not codes else "failed"
            raise LaunchError(f"ranks {sorted(rank_of[r] for r in pending)} {failing}: still running after "
                              + (f"{timeout:g}s (ray.timeout_s)" if not codes else "another rank failed"))
        for ref in done:
            rank = rank_of[ref]
            try:
                codes[rank], outputs[rank], logs[rank] = ray.get(ref)
            except ray.exceptions.RayError as exc:
                codes[rank], outputs[rank], logs[rank] = 1, "", ""
                log.error("rank %d died: %s", rank, exc)
            if codes[rank] != 0:
                grace = time.monotonic() + FAILURE_GRACE_S
                deadline = grace if deadline is None else min(deadline, grace)
                timeout = FAILURE_GRACE_S
    return codes, outputs, logs


# ---- serve --restart N: the driver runs the front-end, its supervisor restarts the actors --------------


def supervise_on_ray(ray, args: list[str], ranks: RankActors) -> int:
    """The HTTP front-end and the supervisor in this driver; each incarnation of the rank job is
    a fresh set of rank actors in the same placement groups, running `serve --engine-only`."""
    from dist_infer.cli import build_parser, serve_options
    from dist_infer.launchers.commands import serve_address
    from dist_infer.workers.engine_loop import engine_key_env
    from dist_infer.workers.serve import check_serve_options, supervise

    parsed = build_parser().parse_args(args)
    parsed.raw_argv = list(args)
    opts = serve_options(parsed)
    if opts.control_host == "127.0.0.1":  # rank 0's actor may run on another node
        opts.control_host = ray.util.get_node_ip_address()
    check_serve_options(opts, launcher="ray")
    host, port = serve_address(args)
    log.info("dist_infer: serving at http://%s:%d (front-end in this driver)", host or opts.control_host, port)

    async def start_job(addresses):
        return await RayRankJob.start(ranks, [*opts.rank_args, "--engine-only", "--connect", addresses.joined()])

    ranks.env.update(engine_key_env())  # rank 0's actor signs its frames with the supervisor's key
    return supervise(opts, start_job)


class RayRankJob:
    """One incarnation of the rank actors, as the supervisor's RankJob: it ends when a rank ends
    with an error or dies (the others are killed then), or when every rank returns."""

    def __init__(self, ranks: RankActors, actors: list, refs: list):
        self.ranks, self.actors, self.refs = ranks, actors, refs
        self._cause: str | None = None

    @classmethod
    async def start(cls, ranks: RankActors, argv: list[str]) -> RayRankJob:
        import asyncio

        actors = ranks.create()
        try:
            master, _ = await asyncio.to_thread(ranks.started, actors)
        except LaunchError:
            _kill_all(ranks.ray, actors)
            raise
        return cls(ranks, actors, [a.run.remote(list(argv), *master) for a in actors])

    async def wait(self) -> int:
        import asyncio

        return await asyncio.to_thread(self._wait)

    def _wait(self) -> int:
        ray, rank_of, pending = self.ranks.ray, {ref: r for r, ref in enumerate(self.refs)}, list(self.refs)
        while pending:
            (ref,), pending = ray.wait(pending, num_returns=1)
            code = self._result(ref, rank_of[ref])
            if code != 0:
                self._hear_the_others(pending, rank_of)
                _kill_all(ray, self.actors)
                return code
        return 0

    def _hear_the_others(self, pending: list, rank_of: dict, grace_s: float = 2.0) -> None:
        """A rank failed without saying why (an error every rank raised is logged by rank 0 only):
        the ranks ending with it get a moment to say it."""
        if self._cause is None and pending:
            done, _ = self.ranks.ray.wait(pending, num_returns=len(pending), timeout=grace_s)
            for ref in done:
                self._result(ref, rank_of[ref])

    def _result(self, ref, rank: int) -> int:
        from dist_infer.serve.supervisor import BAD_INPUT_EXIT, CAUSE_WORDS, error_message

        try:
            code, _, err = self.ranks.ray.get(ref)
        except self.ranks.ray.exceptions.RayError as exc:
            from dist_infer.launchers.ray_actors import last_words

            words = last_words(self.actors[rank])  # its step watchdog ended it (os._exit): why
            died = f"rank {rank}'s actor died: {str(exc).splitlines()[0][:300]}"
            self._cause = self._cause or (f"{words} ({died})" if words else died)
            return 1
        lines = err.splitlines()
        named = [line.strip() for line in lines if any(w in line for w in CAUSE_WORDS)]
        errors = [m for m in map(error_message, lines) if m]  # what a rank refused (exit 2), or its error
        said = errors + named if code == BAD_INPUT_EXIT else named + errors
        if code and said:
            self._cause = self._cause or said[0]
        return code

    def cause(self) -> str | None:
        return self._cause

    async def kill(self) -> None:
        _kill_all(self.ranks.ray, self.actors)


def _kill_all(ray, actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # already gone
            pass


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m dist_infer.launchers.ray_driver",
                                description="Run `dist-infer ARGS` with one Ray actor per rank.")
    p.add_argument("--address", default=None, help="Ray GCS address (default: RAY_ADDRESS, as set by `ray job "
                                                   "submit`, else auto)")
    p.add_argument("--tp", type=int, default=None, help="default: from the engine's engine.json")
    p.add_argument("--pp", type=int, default=None)
    p.add_argument("--cpus-per-rank", type=float, default=1)
    p.add_argument("--gpus-per-rank", type=float, default=0)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE", help="set in every rank")
    p.add_argument("--timeout", type=float, default=None, help="seconds before the ranks are killed")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("args", nargs=argparse.REMAINDER, help="-- then the dist-infer sub-command and its arguments")
    return p


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    from dist_infer.log import setup_logging

    setup_logging(opts.log_level, rank=0)
    args = opts.args[1:] if opts.args[:1] == ["--"] else opts.args
    try:
        env = dict(kv.split("=", 1) for kv in opts.env if "=" in kv)
        tp, pp = opts.tp, opts.pp
        if tp is None or pp is None:
            from dist_infer.launchers.cluster import read_engine_mapping
            from dist_infer.launchers.commands import _flag_value

            engine = _flag_value(args, "--engine")
            mapping = read_engine_mapping(engine) if engine else None
            if mapping is None:
                raise LaunchError(f"cannot size the job: pass --tp/--pp or an --engine with an engine.json "
                                  f"(got {engine!r}).")
            tp, pp = mapping.tp, mapping.pp
        return run_on_ray(args, tp, pp, opts.address, opts.cpus_per_rank, opts.gpus_per_rank, env, opts.timeout)
    except DistInferError as exc:
        log.error("%s", exc)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
