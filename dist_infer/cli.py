"""`dist-infer` command line: partition, build, run.

User errors (DistInferError) print one clear line and exit non-zero without a
traceback. Any other failure in a multi-rank job aborts the whole job so no
rank is left waiting in a collective.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import traceback
from pathlib import Path

from dist_infer.errors import CheckpointError, DistInferError, LaunchError

log = logging.getLogger("dist_infer")


def _partition(args) -> int:
    from dist_infer.partition import partition

    partition(args.model, args.tp, args.pp, Path(args.out), force=args.force, progress=not args.quiet)
    print(f"checkpoint written to {args.out}")
    return 0


def _build(args) -> int:
    from dist_infer.comm import world_from_launch
    from dist_infer.config import BuildConfig
    from dist_infer.engine.build import build

    config = BuildConfig(dtype=args.dtype, max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len,
                         kv_block_size=args.kv_block_size, **_quant_options(args))
    world = world_from_launch()
    if args.random_weights:
        from dist_infer.engine.random_engine import build_random_engine

        build_random_engine(args.random_weights, Path(args.out), args.tp, args.pp, config,
                            Path(args.tokenizer) if args.tokenizer else None, world=world, force=args.force)
        if world.rank == 0:
            print(f"engine written to {args.out}")
        return 0
    if not args.checkpoint:
        raise CheckpointError("build needs --checkpoint DIR (a partitioned checkpoint), or --random-weights PRESET.")
    build(Path(args.checkpoint), Path(args.out), config, world, force=args.force)
    if world.rank == 0:
        print(f"engine written to {args.out}")
    return 0


def _quant_options(args) -> dict:
    """BuildConfig's quantization fields from the flags; BuildConfig validates the mode."""
    from dist_infer.config import DEFAULT_QUANT_GROUP_SIZE
    from dist_infer.errors import LayoutError

    if args.quant_group_size is not None and args.quant != "int4_wo":
        raise LayoutError("--quant-group-size applies to --quant int4_wo only (int8_wo and fp8 have one scale "
                          "per output channel); drop it or use --quant int4_wo.")
    return dict(quant=args.quant, quant_group_size=args.quant_group_size or DEFAULT_QUANT_GROUP_SIZE,
                quant_lm_head=args.quant_lm_head)


def _refit(args) -> int:
    from dist_infer.engine.refit import describe, refit

    result = refit(Path(args.engine), Path(args.checkpoint), progress=not args.quiet)
    print(describe(result))
    return 0


def _run(args) -> int:
    from dist_infer.workers.run import RunOptions, run

    _warn_escaped_stops(args.stop)
    return run(RunOptions(
        engine=Path(args.engine), prompts=args.prompt, prompts_file=args.prompts_file,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
        chat_template=not args.no_chat_template, json_output=args.json, num_beams=args.num_beams,
        length_penalty=args.length_penalty, early_stopping=args.early_stopping, **_rank_engine_options(args)))


def _rank_engine_options(args) -> dict:
    """workers.run.RankEngineOptions' fields from the flags `run` and `serve` share."""
    return dict(verify=not args.no_verify, device=args.device, max_num_batched_tokens=args.max_num_batched_tokens,
                prefix_cache=not args.no_prefix_cache, async_scheduling=not args.no_async_scheduling,
                pipeline_depth=args.pipeline_depth, num_kv_blocks=args.num_kv_blocks, kv_cache=_kv_cache_config(args), step_timeout=args.step_timeout)


def _serve(args) -> int:
    from dist_infer.workers.serve import check_serve_options, serve

    opts = serve_options(args)
    check_serve_options(opts)  # every rank, before any rank loads anything
    return serve(opts)


def serve_options(args):
    """ServeOptions from `serve`'s parsed flags (also the Ray driver's, for `serve --restart N`)."""
    from dist_infer.workers.serve import ServeOptions

    return ServeOptions(
        engine=Path(args.engine), host=args.host, port=args.port, served_model_name=args.served_model_name,
        max_queue=args.max_queue, api_key=args.api_key, shutdown_timeout=args.shutdown_timeout,
        keepalive_s=args.keepalive, frontend=not args.no_frontend, ipc_dir=Path(args.ipc_dir) if args.ipc_dir else None,
        connect=args.connect, restart=args.restart, launcher_cmd=args.launcher_cmd, rank_cmd=args.rank_cmd,
        control_host=args.control_host, start_timeout=args.start_timeout, rank_args=rank_serve_args(args.raw_argv),
        enable_admin=args.enable_admin, **_rank_engine_options(args))


# `serve --restart N`: flags of the supervisor and its front-end, not passed on to the ranks it starts
# (the API key never leaves this process).
SUPERVISOR_FLAGS = ("--restart", "--launcher-cmd", "--rank-cmd", "--control-host", "--start-timeout", "--host",
                    "--port", "--api-key", "--max-queue", "--served-model-name")


def rank_serve_args(argv: list[str]) -> list[str]:
    """The supervisor's own command line without its own flags: the ranks' `serve` arguments.
    (The serve parser allows no abbreviations, so the flags are matched exactly.)"""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in SUPERVISOR_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f + "=" for f in SUPERVISOR_FLAGS)):
            out.append(arg)
    return out


def _connect_addresses(text: str):
    from dist_infer.workers.engine_loop import EngineAddresses

    try:
        return EngineAddresses.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _command(text: str) -> list[str]:
    import shlex

    try:
        words = shlex.split(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"cannot split {text!r} into words: {exc}") from None
    if not words:
        raise argparse.ArgumentTypeError("an empty command")
    return words


def _bench(args) -> int:
    from dist_infer.bench import BenchReport, check_output_json, run_bench

    output_json = Path(args.output_json) if args.output_json else None
    check_output_json(output_json)
    return run_bench(args.model, args.tp, args.pp, args.batch_size, args.input_len, args.output_len,
                     dtype=args.dtype, baseline=args.baseline, cuda_graphs=not args.no_cuda_graphs,
                     engine_dir=Path(args.engine) if args.engine else None, kv_cache=_kv_cache_config(args),
                     max_load=_max_load(args), report=BenchReport(output_json),
                     async_scheduling=not args.no_async_scheduling, pipeline_depth=args.pipeline_depth)


def _max_load(args):
    from dist_infer.bench import MaxLoad

    if args.num_requests is None:
        if args.max_batch_size is not None:
            raise LaunchError("--max-batch-size sizes the max-load run; add --num-requests N.")
        return None
    if args.baseline:
        raise LaunchError("--baseline hf compares fixed batches; drop it with --num-requests (max-load mode).")
    return MaxLoad(args.num_requests, args.max_batch_size, args.max_num_batched_tokens)


def _kv_cache_config(args):
    from dist_infer.config import KVCacheConfig

    return KVCacheConfig(args.kv_cache_dtype, args.kv_cache_free_gpu_memory_fraction, args.kv_cache_bytes)


def _launch(args) -> int:
    from dist_infer.launchers import launch

    # A --log-level other than the default is passed on to every rank.
    level = None if args.log_level == "INFO" else args.log_level
    return launch(args.cluster, args.args, dry_run=args.dry_run, log_level=level)


# ---- argument checks: every rank parses the same argv, so a bad value is refused
# here, before MPI starts work or any rank loads an engine (not 15 s later).

def _int_at_least(low: int, meaning: str = ""):
    def check(text: str) -> int:
        value = _parse(text, int, "an integer")
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}{meaning}, got {value}")
        return value
    return check


def _seconds(text: str) -> float:
    value = _parse(text, float, "a number of seconds")
    if not 0 < value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _temperature(text: str) -> float:
    value = _parse(text, float, "a number")
    if not value >= 0 or value == float("inf"):  # `not >=` also catches nan
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 = greedy), got {text}")
    return value


def _top_p(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (1 = off), got {text}")
    return value


def _memory_fraction(text: str) -> float:
    value = _parse(text, float, "a number")
    if not 0 < value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be in (0, 1] (a share of the GPU memory free after the weights "
                                         f"load; default 0.9), got {text}")
    return value


BYTE_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def _byte_size(text: str) -> int:
    """Bytes: 2147483648, 2GiB, 512MiB, 1.5GB (KB/MB/GB/TB are powers of 1000, KiB/MiB/GiB/TiB of 1024)."""
    import re

    match = re.fullmatch(r"\s*([0-9.]+)\s*([a-z]*)\s*", text.lower())
    if match is None or match.group(2) not in ("", *BYTE_UNITS):
        raise argparse.ArgumentTypeError(f"expected bytes, or a number with KB, MB, GB, TB (powers of 1000) or KiB, "
                                         f"MiB, GiB, TiB (powers of 1024), e.g. 8GiB; got {text!r}")
    value = _parse(match.group(1), float, "a size such as 8GiB or 2000000000")
    size = int(value * BYTE_UNITS.get(match.group(2), 1))
    if not size >= 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, got {text}")
    return size


def _parse(text: str, kind, what: str):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


DEVICES = ("cpu", "cuda")


def _device(text: str) -> str:
    """cpu, or cuda (each rank takes the GPU of its local rank); anything else
    would fail inside torch on every rank with a traceback."""
    if text in DEVICES:
        return text
    raise argparse.ArgumentTypeError(f"unknown device {text!r}; use cpu or cuda (each rank picks its own GPU)")


def _check_prompts(parser: argparse.ArgumentParser, prompts: list[str]) -> None:
    """An empty prompt would be answered as if the user had said nothing (the chat
    template alone): refuse it, naming it (numbered from 0, as every later message does)."""
    for index, text in enumerate(prompts):
        if not text.strip():
            parser.error(f"prompt {index} (--prompt number {index + 1}) is empty; give it some text or drop it.")


def _check_beam_search(parser: argparse.ArgumentParser, args) -> None:
    """Beam search is deterministic: refuse sampling flags beside it (before any rank loads)."""
    if args.num_beams == 1:
        return
    conflicts = [flag for flag, on in (("--temperature", args.temperature > 0), ("--top-k", args.top_k > 0),
                                       ("--top-p", args.top_p < 1), ("--stop", bool(args.stop))) if on]
    if conflicts:
        parser.error(f"--num-beams {args.num_beams} cannot be combined with {', '.join(conflicts)} (beam search "
                     "is deterministic and has no stop strings yet); drop them or use --num-beams 1.")
    if args.num_beams > MAX_BEAMS:
        parser.error(f"--num-beams {args.num_beams} is over the most supported ({MAX_BEAMS}: each beam returns its "
                     "top 2*num_beams logprobs, at most 20); use a smaller --num-beams.")


MAX_BEAMS = 10


def _early_stopping(text: str) -> bool | str:
    values = {"true": True, "false": False, "never": "never"}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"must be true, false or never, got {text}")
    return values[text.lower()]


def _length_penalty(text: str) -> float:
    value = _parse(text, float, "a number")
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number (1 = average logprob per token), got {text}")
    return value


def _stop(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("an empty stop string would end every answer at once; drop it")
    return text


def _warn_escaped_stops(stops: list[str]) -> None:
    """The shell passes --stop "\\n" as backslash + n, which never appears in text.
    We do not unescape (a literal backslash stop must stay possible); we say so."""
    from dist_infer.log import launch_rank

    escaped = [s for s in stops if "\\n" in s or "\\t" in s]
    if escaped and launch_rank() == 0:
        print(f"dist-infer: warning: --stop '{escaped[0]}' contains a literal backslash (the shell does not turn "
              "\\n into a newline); for a newline write --stop $'\\n' in bash.", file=sys.stderr, flush=True)


PARSE_ERROR_GRACE_S = 1.0


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """Every rank of a job parses the same argv: rank 0 alone prints the error."""
        from dist_infer.log import launch_rank

        if launch_rank() == 0:
            sys.stderr.write(f"{self.format_usage()}{self.prog}: error: {message}\n")  # one write: all or nothing
            sys.stderr.flush()
        else:
            # mpirun kills the job when the first rank exits non-zero: let rank 0 be that
            # rank, so its message is out before the others are killed.
            import time

            time.sleep(PARSE_ERROR_GRACE_S)
        sys.exit(2)


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=None,
                   help="tokens in one step, prefill chunks and decodes together (default: 2048, or the "
                        "engine's max batch size if larger); long prompts are prefilled in chunks")
    p.add_argument("--no-prefix-cache", action="store_true",
                   help="do not reuse the KV of prompt prefixes shared between requests")
    _async_scheduling_arg(p)
    p.add_argument("--num-kv-blocks", type=_int_at_least(1), default=None,
                   help="cap the KV pool at this many blocks (default: what memory and the engine allow); "
                        "a pool too small for every request at once preempts and recomputes")
    p.add_argument("--step-timeout", type=_seconds, default=None, metavar="S",
                   help="with more than one rank: end the job, naming the rank and host, when a rank stops "
                        "sending heartbeats or a step runs this long (default: 30 s on GPUs, 600 s on CPU, "
                        "whose steps of long prompts can take minutes); exit code 3")


def _async_scheduling_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-async-scheduling", action="store_true",
                   help="plan each step only after the previous one's tokens are back on the host (by default the "
                        "next step is queued while one runs; single-stage engines, beam search steps in turn)")
    p.add_argument("--pipeline-depth", type=_int_at_least(1), default=None, metavar="N",
                   help="pipeline-parallel engines: steps in flight at once, each a micro-batch of its own "
                        "sequences (default: one per stage, so every stage works; 1: the stages run in turn)")


def _kv_cache_args(p: argparse.ArgumentParser) -> None:
    """How each rank sizes and stores its KV pool (TensorRT-LLM's and vLLM's flag names)."""
    from dist_infer.config import KV_CACHE_DTYPES

    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES,
                   help="auto: the engine's dtype; fp8: float8 e4m3 (one scale per layer, 1.0), half the bytes per "
                        "token, so the same memory holds twice the KV blocks (GPU: compute capability >= 8.9)")
    p.add_argument("--kv-cache-free-gpu-memory-fraction", type=_memory_fraction, default=None, metavar="F",
                   help="share (0, 1] of the GPU memory free after the weights load (less the step's working "
                        "memory) that the KV pool may take (default 0.9); ignored on CPU")
    p.add_argument("--kv-cache-bytes", type=_byte_size, default=None, metavar="SIZE",
                   help="at most this much KV pool per rank (e.g. 4GiB); with the fraction, the smaller wins. "
                        "The pool never exceeds max_batch_size full-length sequences per pipeline stage")


def _restart_args(p: argparse.ArgumentParser) -> None:
    """Supervised restart (README: "Restart after a failure"); the last three are what the ranks get."""
    p.add_argument("--restart", type=_int_at_least(0), default=0, metavar="N",
                   help="run the HTTP front-end here and the rank job as its child; when the job fails, start it "
                        "again (at most N times) and resume every unfinished request (default 0: no supervisor)")
    p.add_argument("--launcher-cmd", type=_command, default=[], metavar="CMD",
                   help="with --restart: the command that starts the ranks, e.g. 'mpirun -n 4' (not needed for a "
                        "one-rank engine)")
    p.add_argument("--rank-cmd", type=_command, default=[], metavar="CMD",
                   help="with --restart: how a rank runs dist_infer (default: this Python -m dist_infer)")
    p.add_argument("--control-host", default="127.0.0.1", metavar="ADDR",
                   help="with --restart: this node's address that rank 0 connects to (default 127.0.0.1; set it "
                        "when rank 0 runs on another node)")
    p.add_argument("--start-timeout", type=_seconds, default=300.0, metavar="S",
                   help="with --restart: a (re)started rank job must have its engine ready within S seconds")
    p.add_argument("--engine-only", dest="no_frontend", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--connect", type=_connect_addresses, default=None, help=argparse.SUPPRESS)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="dist-infer", description="Distributed LLM inference: "
                                     "partition -> build -> run (under mpirun, Ray or Slurm).")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("partition", help="split a HF checkpoint into per-rank TP/PP shards")
    p.add_argument("--model", required=True, help="HF model directory, a .gguf file, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    p.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    p.add_argument("--out", required=True, help="output checkpoint directory")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_partition)

    b = sub.add_parser("build", help="build per-rank engines from a partitioned checkpoint "
                                     "(one process, or one process per rank under mpirun)")
    b.add_argument("--checkpoint", help="partitioned checkpoint directory (from `dist-infer partition`)")
    b.add_argument("--random-weights", metavar="PRESET", help="instead of a checkpoint: random weights at a "
                   "preset's shape (e.g. llama-3-8b), for benchmarks; the tokenizer comes from --tokenizer")
    b.add_argument("--tokenizer", help="with --random-weights: a HF tokenizer directory (default: SmolLM2's)")
    b.add_argument("--tp", type=int, default=1, help="with --random-weights: tensor-parallel size")
    b.add_argument("--pp", type=int, default=1, help="with --random-weights: pipeline-parallel size")
    b.add_argument("--out", required=True, help="engine directory")
    b.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    b.add_argument("--max-batch-size", type=int, default=8)
    b.add_argument("--max-seq-len", type=int, default=None,
                   help="longest prompt + output (default: the model's limit, at most 4096)")
    b.add_argument("--kv-block-size", type=int, default=16)
    b.add_argument("--quant", metavar="MODE", default=None,
                   help="quantize the linear layers' weights: int8_wo (INT8, per-channel scales), int4_wo (INT4, "
                        "group-wise scales) or fp8 (FP8 e4m3 weights and per-token activations); "
                        "default: keep --dtype")
    b.add_argument("--quant-group-size", type=int, default=None,
                   help="with --quant int4_wo: input features per scale (default 128; a power of two >= 16)")
    b.add_argument("--quant-lm-head", action="store_true",
                   help="quantize the LM head too (by default it and the embeddings stay in --dtype)")
    b.add_argument("--force", action="store_true", help="replace --out if it exists")
    b.set_defaults(func=_build)

    f = sub.add_parser("refit", help="swap new weights of the same architecture into a built engine (no rebuild); "
                                     "a server started with --enable-admin takes them on POST /admin/update_weights")
    f.add_argument("--engine", required=True, help="the engine directory to refit in place")
    f.add_argument("--checkpoint", required=True,
                   help="HF model directory (or .gguf) with the new weights, same architecture as the engine")
    f.add_argument("--quiet", action="store_true", help="no progress bar")
    f.set_defaults(func=_refit)

    r = sub.add_parser("run", help="generate text; launch with `mpirun -n TP*PP` for multi-rank engines")
    r.add_argument("--engine", required=True)
    r.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for a batch)")
    r.add_argument("--prompts-file", help="text file (one prompt per line), .jsonl ({'prompt'} or "
                                          "{'input_ids'} per line), or - for stdin")
    r.add_argument("--max-new-tokens", type=_int_at_least(1), default=64)
    r.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy")
    r.add_argument("--top-k", type=_int_at_least(0, " (0 = off)"), default=0)
    r.add_argument("--top-p", type=_top_p, default=1.0)
    r.add_argument("--seed", type=int, default=None, help="prompt i samples with seed SEED+i (default: random)")
    r.add_argument("--num-beams", type=_int_at_least(1), default=1,
                   help="beam search with this many beams (1 = greedy or sampling); output equals transformers' "
                        "generate(num_beams=K)")
    r.add_argument("--length-penalty", type=_length_penalty, default=1.0,
                   help="beam search: a finished beam scores sum(logprobs) / length**F (default 1.0)")
    r.add_argument("--early-stopping", type=_early_stopping, default=False, metavar="{true,false,never}",
                   help="beam search: stop when num_beams hypotheses are done (true), when none can improve "
                        "by a heuristic (false, default), or by the exact bound (never), as transformers")
    r.add_argument("--stop", action="append", default=[], type=_stop,
                   help="stop string (repeatable); for a newline use bash's $'\\n' (\"\\n\" is a backslash and n)")
    r.add_argument("--ignore-eos", action="store_true", help="generate max-new-tokens even past EOS")
    r.add_argument("--no-chat-template", action="store_true", help="tokenize prompts as plain text")
    r.add_argument("--json", action="store_true", help="one JSON object per prompt on stdout")
    r.add_argument("--no-verify", action="store_true", help="skip the sha256 check of engine files at load")
    r.add_argument("--device", default="cpu", type=_device, help="cpu or cuda")
    _scheduler_args(r)
    _kv_cache_args(r)
    r.set_defaults(func=_run)

    # No abbreviated flags: `serve --restart` passes its argv on to the ranks minus its own flags (rank_serve_args).
    v = sub.add_parser("serve", help="OpenAI- and Triton-compatible HTTP server; launch with `mpirun -n TP*PP`",
                       allow_abbrev=False)
    v.add_argument("--engine", required=True)
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--served-model-name", help="the model name clients send (default: the engine directory's name)")
    v.add_argument("--max-queue", type=int, default=1024,
                   help="requests waiting beyond the running batch before new ones get 503")
    v.add_argument("--api-key", default=os.environ.get("DIST_INFER_API_KEY"),
                   help="require `Authorization: Bearer KEY` (default: $DIST_INFER_API_KEY)")
    v.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM/SIGINT waits for running requests before aborting them")
    v.add_argument("--device", default="cpu", type=_device, help="cpu or cuda")
    v.add_argument("--no-verify", action="store_true", help="skip the sha256 check of engine files at load")
    v.add_argument("--enable-admin", action="store_true",
                   help="enable POST /admin/update_weights {\"engine\": DIR}: the ranks take the weights of a "
                        "`dist-infer refit` engine between steps (no restart; off by default)")
    _scheduler_args(v)
    _kv_cache_args(v)
    v.add_argument("--keepalive", type=float, default=30.0, help=argparse.SUPPRESS)  # idle ranks' empty-step period
    v.add_argument("--no-frontend", action="store_true", help=argparse.SUPPRESS)     # engine only (dist_infer.LLM)
    v.add_argument("--ipc-dir", help=argparse.SUPPRESS)                              # its sockets' directory
    _restart_args(v)
    v.set_defaults(func=_serve)

    from dist_infer.presets import PRESETS

    k = sub.add_parser("bench", help="GPU throughput/latency on a random-weight model at a real shape; "
                                     "launch with `mpirun -n TP*PP`")
    k.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    k.add_argument("--tp", type=int, default=1)
    k.add_argument("--pp", type=int, default=1)
    k.add_argument("--batch-size", type=int, nargs="+", default=[1, 8, 64])
    k.add_argument("--input-len", type=int, default=128)
    k.add_argument("--output-len", type=int, default=128)
    k.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    k.add_argument("--baseline", choices=["hf"], help="also run transformers generate on rank 0's GPU")
    k.add_argument("--no-cuda-graphs", action="store_true")
    k.add_argument("--engine", help="measure this built engine instead of a random-weight preset (--baseline hf: "
                                    "a random-weights engine, against transformers at its preset and vocabulary)")
    _kv_cache_args(k)
    k.add_argument("--num-requests", type=_int_at_least(1), default=None, metavar="N",
                   help="max-load mode (trtllm-bench's throughput run): submit N requests of --input-len/--output-len "
                        "at once and report end-to-end output tokens/s and TTFT; --batch-size is then unused")
    k.add_argument("--max-batch-size", type=_int_at_least(1), default=None, metavar="B",
                   help="with --num-requests: sequences in the running batch (default: the engine's max batch "
                        "size; presets are built for 512)")
    k.add_argument("--max-num-batched-tokens", type=_int_at_least(1), default=8192, metavar="T",
                   help="with --num-requests: tokens in one step, prefill chunks and decodes together")
    _async_scheduling_arg(k)
    k.add_argument("--output-json", metavar="FILE",
                   help="also write every case's figures to FILE as JSON ({\"results\": [{field: value}]})")
    k.set_defaults(func=_bench)

    la = sub.add_parser("launch", help="start a job from a cluster file (clusters/*.yaml): mpirun, sbatch or Ray",
                        description="dist-infer launch --cluster FILE [--dry-run] [-- run|serve ARGS]")
    la.add_argument("--cluster", required=True, help="cluster YAML (see clusters/)")
    la.add_argument("--dry-run", action="store_true", help="print the command (and hostfile / batch script) only")
    la.add_argument("args", nargs=argparse.REMAINDER, help="-- then the sub-command every rank runs "
                                                           "(default: run) and its arguments")
    la.set_defaults(func=_launch)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.raw_argv = list(sys.argv[1:] if argv is None else argv)  # serve --restart passes it on to the ranks
    if args.command == "run":
        _check_prompts(parser, args.prompt)
        _check_beam_search(parser, args)
    from dist_infer.log import launch_rank, setup_logging

    setup_logging(args.log_level)
    try:
        return args.func(args)
    except DistInferError as exc:
        collective = getattr(exc, "collective", False)
        if not collective or launch_rank() == 0:  # every rank has the same message: rank 0 says it
            log.error("%s", exc)
        if not collective:
            _abort_job(exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM where a command turns it into one (interrupts.py)
        from dist_infer.interrupts import exit_code

        return exit_code(exc)
    except Exception as exc:  # a bug: keep the traceback, and do not leave other ranks hanging
        from dist_infer.interrupts import delivered, exit_code

        if (signal_exc := delivered()) is not None:  # SIGTERM, disguised by a C extension (interrupts.delivered)
            log.warning("%s (it surfaced as %s: %s)", signal_exc, type(exc).__name__, exc)
            return exit_code(signal_exc)
        log.error("unexpected failure:\n%s", traceback.format_exc())
        _abort_job(1)
        return 1


def _abort_job(code: int) -> None:
    """In a multi-rank job, a failure on one rank must take the others down
    (MPI aborts the job; a gloo rank exits at once and its launcher ends the rest)."""
    from dist_infer.comm.bootstrap import current_world

    world = current_world()
    if world is not None and world.size > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        world.abort(code)


if __name__ == "__main__":
    sys.exit(main())
