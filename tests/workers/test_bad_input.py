"""User errors: each gives a clear message (key words asserted), a non-zero
exit, no Python traceback, and no hang (every subprocess has a timeout)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import flip_middle_bytes, make_tiny_model, run_cli, write_prompts

TIMEOUT = 120


def assert_clean_failure(proc, *words):
    err = proc.stderr
    assert proc.returncode != 0, f"expected failure, got exit 0\nstdout:\n{proc.stdout}\nstderr:\n{err[-3000:]}"
    assert "Traceback" not in err and "Traceback" not in proc.stdout, err[-3000:]
    for w in words:
        assert w in err, f"{w!r} not in stderr:\n{err[-3000:]}"


def _ok(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\nstderr:\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    make_tiny_model(root / "hf", "llama")  # 8 heads, 2 KV heads, MLP 128, 4 layers, vocab 301
    return root


def _checkpoint(root: Path, tp: int, pp: int) -> Path:
    out = root / f"ckpt-tp{tp}pp{pp}"
    if not out.exists():
        from dist_infer.partition import partition  # what `dist-infer partition` calls

        partition(root / "hf", tp, pp, out, progress=False)
    return out


def _engine(root: Path, tp: int, pp: int, *build_args: str) -> Path:
    out = root / f"engine-tp{tp}pp{pp}{''.join(build_args).replace('-', '_')}"
    if not out.exists():
        _ok(run_cli("build", "--checkpoint", str(_checkpoint(root, tp, pp)), "--out", str(out), *build_args,
                    timeout=TIMEOUT))
    return out


@pytest.fixture(scope="module")
def engine2(root) -> Path:
    """A 2-rank (TP=2) engine without a tokenizer, max_seq_len 16."""
    return _engine(root, 2, 1, "--max-seq-len", "16")


# ------------------------------------------------------------------ partition

def test_heads_not_divisible_by_tp(root, tmp_path):
    out = tmp_path / "ckpt"
    proc = run_cli("partition", "--model", str(root / "hf"), "--tp", "3", "--out", str(out), "--quiet",
                   timeout=TIMEOUT)
    assert_clean_failure(proc, "tp=3 does not divide the 8 attention heads", "Valid TP sizes for this model: 1, 2, 4, 8",
                         "--tp 1 --pp 3")
    assert not out.exists()


def test_smollm2_tp2_refused_with_valid_sizes_and_pp_hint(smollm2_dir, tmp_path):
    out = tmp_path / "ckpt"
    proc = run_cli("partition", "--model", str(smollm2_dir), "--tp", "2", "--out", str(out), "--quiet",
                   timeout=TIMEOUT)
    assert_clean_failure(proc, "9 attention heads", "Valid TP sizes for this model: 1, 3", "--tp 1 --pp 2")
    assert not out.exists()


def test_more_stages_than_layers(root, tmp_path):
    out = tmp_path / "ckpt"
    proc = run_cli("partition", "--model", str(root / "hf"), "--pp", "5", "--out", str(out), "--quiet",
                   timeout=TIMEOUT)
    assert_clean_failure(proc, "pp=5 is more pipeline stages than the model's 4 layers", "Valid PP sizes: 1..4")
    assert not out.exists()


# ------------------------------------------------------------- build: shards

def test_missing_shard(root, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_checkpoint(root, 2, 1), ckpt)
    (ckpt / "rank1.safetensors").unlink()
    out = tmp_path / "engine"
    proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), world=2, timeout=TIMEOUT)
    assert_clean_failure(proc, "checkpoint rank 1", "missing", "Partition the model again")
    assert not out.exists()


def test_corrupted_shard(root, tmp_path):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_checkpoint(root, 2, 1), ckpt)
    flip_middle_bytes(ckpt / "rank0.safetensors")
    out = tmp_path / "engine"
    proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), world=2, timeout=TIMEOUT)
    assert_clean_failure(proc, "checkpoint rank 0", "corrupt", "sha256", "Partition the model again")
    assert not out.exists()


# ------------------------------------------------------------ run: launching

def test_mpirun_with_too_few_processes(root, tmp_path):
    engine = _engine(root, 2, 2)
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    proc = run_cli("run", "--engine", str(engine), "--prompts-file", str(prompts), world=2, timeout=TIMEOUT)
    assert_clean_failure(proc, "tp=2 x pp=2 = 4 ranks", "this job has 2", "mpirun -n 4")


def test_plain_run_on_multi_rank_engine(engine2, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    proc = run_cli("run", "--engine", str(engine2), "--prompts-file", str(prompts), timeout=TIMEOUT)
    assert_clean_failure(proc, "tp=2 x pp=1 = 2 ranks", "this job has 1", "mpirun -n 2")


# ------------------------------------------------------------ run: requests
# Rank 0 rejects the request while rank 1 waits in its step loop: the job must
# still end (rank 1 released), with the message once from rank 0.

def _run2(engine2, *args, prompts=None, tmp_path=None, **kw):
    if prompts is not None:
        args = ("--prompts-file", str(write_prompts(tmp_path / "p.jsonl", prompts)), *args)
    return run_cli("run", "--engine", str(engine2), "--json", *args, world=2, timeout=TIMEOUT, **kw)


@pytest.mark.parametrize("length", [16, 20])
def test_prompt_longer_than_max_seq_len(engine2, tmp_path, length):
    proc = _run2(engine2, prompts=[[1, 2, 3], list(range(1, length + 1))], tmp_path=tmp_path)
    assert_clean_failure(proc, f"prompt 1 has {length} tokens", "max_seq_len is 16", "--max-seq-len")
    assert proc.stdout.strip() == ""  # nothing generated for the valid prompt either
    assert proc.stderr.count("max_seq_len is 16") == 1  # reported once (by rank 0), not per rank


def test_prompt_that_fits_runs(engine2, tmp_path):
    """The boundary: 15 prompt tokens leave room for exactly one new token."""
    proc = _ok(_run2(engine2, "--max-new-tokens", "8", "--ignore-eos", prompts=[list(range(1, 16)), [1, 2]],
                     tmp_path=tmp_path))
    outs = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [len(c["output_ids"]) for c in outs] == [1, 8]
    assert [c["finish_reason"] for c in outs] == ["length", "length"]
    # Prompt 0 is capped by max_seq_len, not by --max-new-tokens: said once, with the numbers.
    warning = "prompt 0 has 15 tokens: with --max-new-tokens 8 that is 23, over the engine's max_seq_len 16"
    assert proc.stderr.count(warning) == 1, proc.stderr[-3000:]
    assert "at most 1 new tokens" in proc.stderr and "prompt 1 has" not in proc.stderr


@pytest.mark.parametrize("content", ["", "\n  \n\n"], ids=["empty", "blank-lines"])
def test_empty_prompt_file(engine2, tmp_path, content):
    f = tmp_path / "p.jsonl"
    f.write_text(content)
    proc = _run2(engine2, "--prompts-file", str(f))
    assert_clean_failure(proc, "no prompts", "--prompts-file")


def test_empty_token_list(engine2, tmp_path):
    proc = _run2(engine2, prompts=[[1, 2], []], tmp_path=tmp_path)
    assert_clean_failure(proc, "prompt 1 is empty")


def test_token_id_out_of_vocab(engine2, tmp_path):
    proc = _run2(engine2, prompts=[[5, 301, 7, -1]], tmp_path=tmp_path)
    assert_clean_failure(proc, "prompt 0 has token ids outside the vocabulary [0, 301)", "[301, -1]")


def test_text_prompt_on_engine_without_tokenizer(engine2):
    proc = _run2(engine2, "--prompt", "hello world")
    assert_clean_failure(proc, "no tokenizer", "input_ids")


# Further request errors, on a 1-rank engine with a plain `dist-infer run`.

@pytest.fixture(scope="module")
def engine1(root) -> Path:
    return _engine(root, 1, 1)


def test_stop_without_tokenizer(engine1, tmp_path):
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(prompts), "--stop", "\\n\\n",
                   timeout=TIMEOUT)
    assert_clean_failure(proc, "stop strings need a tokenizer")
    assert proc.returncode == 2
    # "\n" from a shell is backslash + n, which never matches: the user is told how to write a newline.
    assert "contains a literal backslash" in proc.stderr and "$'\\n'" in proc.stderr


@pytest.mark.parametrize("command", ["run", "serve"])
def test_pipeline_depth_on_a_one_stage_engine(engine1, tmp_path, command):
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    args = ["--prompts-file", str(prompts)] if command == "run" else ["--port", "1"]
    proc = run_cli(command, "--engine", str(engine1), "--pipeline-depth", "2", *args, timeout=TIMEOUT)
    assert_clean_failure(proc, "--pipeline-depth 2 needs a pipeline-parallel engine", "pp=1", "drop the flag")
    assert proc.returncode == 2


def test_missing_and_malformed_prompt_files(engine1, tmp_path):
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(tmp_path / "nope.jsonl"), timeout=TIMEOUT)
    assert_clean_failure(proc, "nope.jsonl does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, "x"]}\n')
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(bad), timeout=TIMEOUT)
    assert_clean_failure(proc, "line 2", "input_ids")


def assert_refused(proc, *words):
    """A user error: exit code 2, the words on stderr, no traceback."""
    assert_clean_failure(proc, *words)
    assert proc.returncode == 2, f"exit {proc.returncode}, expected 2\n{proc.stderr[-3000:]}"


# ------------------------------------------------- run: arguments, before any rank starts
# Every rank parses the same argv, so these are refused by the argument parser: before
# MPI starts work or an engine is loaded (the engine path is never even looked at).

@pytest.mark.parametrize("args, words", [
    (["--temperature", "-1"], ["argument --temperature", "must be >= 0"]),
    (["--temperature", "nan"], ["argument --temperature", "must be >= 0"]),
    (["--top-p", "2"], ["argument --top-p", "must be in (0, 1]"]),
    (["--top-p", "0"], ["argument --top-p", "must be in (0, 1]"]),
    (["--top-k", "-1"], ["argument --top-k", "must be >= 0"]),
    (["--max-new-tokens", "0"], ["argument --max-new-tokens", "must be >= 1"]),
    (["--num-kv-blocks", "0"], ["argument --num-kv-blocks", "must be >= 1"]),
    (["--device", "tpu"], ["argument --device", "unknown device 'tpu'", "use cpu or cuda"]),
    (["--stop", ""], ["argument --stop", "empty stop string"]),
    (["--prompt", "hi", "--prompt", "  "], ["prompt 1 (--prompt number 2) is empty"]),
    (["--step-timeout", "0"], ["argument --step-timeout", "must be a positive number of seconds"]),
    (["--pipeline-depth", "0"], ["argument --pipeline-depth", "must be >= 1"]),
], ids=["negative-temperature", "nan-temperature", "top-p-2", "top-p-0", "negative-top-k", "max-new-tokens-0",
        "kv-blocks-0", "device-tpu", "empty-stop", "empty-prompt", "step-timeout-0", "pipeline-depth-0"])
def test_bad_run_arguments_refused_at_parse_time(tmp_path, args, words):
    proc = run_cli("run", "--engine", str(tmp_path / "never-read"), *args, timeout=30)
    assert_refused(proc, *words)


def test_bad_argument_under_mpirun_is_reported_once(tmp_path):
    """Each rank parses the same argv; only rank 0 prints, and no rank starts work."""
    proc = run_cli("run", "--engine", str(tmp_path / "never-read"), "--device", "tpu", world=2, timeout=60)
    assert_clean_failure(proc, "unknown device 'tpu'")
    assert proc.stderr.count("unknown device 'tpu'") == 1, proc.stderr
    assert "loaded engine" not in proc.stderr


def test_serve_device_checked_at_parse_time(tmp_path):
    proc = run_cli("serve", "--engine", str(tmp_path / "never-read"), "--device", "tpu", timeout=30)
    assert_refused(proc, "argument --device", "unknown device 'tpu'")


# --------------------------------------------------------------- run: prompt files

def test_prompts_file_not_utf8(engine1, tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("What is 2+2?\nCaf\u00e9 au lait?\n".encode("latin-1"))
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(bad), timeout=TIMEOUT)
    assert_refused(proc, "latin1.txt is not UTF-8 text", "byte 0xe9 on line 2", "iconv")


def test_empty_prompt_in_jsonl_named(engine1, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"input_ids": [1, 2]}\n\n{"prompt": "  "}\n')
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(f), timeout=TIMEOUT)
    assert_refused(proc, "prompt 1 (prompts file line 3) is empty")


# ---------------------------------------------------- partition / build: bad files

def _hf_copy(root: Path, tmp_path: Path, edit) -> Path:
    hf = tmp_path / "hf"
    shutil.copytree(root / "hf", hf)
    edit(hf / "config.json")
    return hf


def _set_field(path: Path, keys: list[str], value) -> None:
    config = json.loads(path.read_text())
    target = config
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.write_text('{"model_type": "llama",'), ["config.json", "not a valid JSON file", "re-download"]),
    (lambda p: _set_field(p, ["num_attention_heads"], "eight"), ["config.json", "num_attention_heads",
                                                                  "re-download"]),
], ids=["not-json", "wrong-type"])
def test_hf_config_json_damaged(root, tmp_path, edit, words):
    out = tmp_path / "ckpt"
    proc = run_cli("partition", "--model", str(_hf_copy(root, tmp_path, edit)), "--out", str(out), "--quiet",
                   timeout=TIMEOUT)
    assert_refused(proc, *words)
    assert not out.exists() and not list(tmp_path.glob(".ckpt*"))


@pytest.mark.parametrize("edit, words", [
    (lambda p: p.write_text("{not json"), ["config.json is not valid JSON", "Partition the model again"]),
    (lambda p: _set_field(p, ["model", "num_heads"], "8"), ["field model.num_heads must be int, got '8'",
                                                            "Partition the model again"]),
    (lambda p: _set_field(p, ["mapping", "tp"], None), ["field mapping.tp must be int", "Partition the model again"]),
], ids=["not-json", "wrong-type", "null-tp"])
def test_checkpoint_config_json_damaged(root, tmp_path, edit, words):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(_checkpoint(root, 1, 1), ckpt)
    edit(ckpt / "config.json")
    out = tmp_path / "engine"
    proc = run_cli("build", "--checkpoint", str(ckpt), "--out", str(out), timeout=TIMEOUT)
    assert_refused(proc, *words)
    assert not out.exists() and not list(tmp_path.glob(".engine*"))


def test_file_named_gguf_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text("<html>404 Not Found</html>")
    out, cache = tmp_path / "ckpt", tmp_path / "cache"
    proc = run_cli("partition", "--model", str(fake), "--out", str(out), "--quiet", timeout=TIMEOUT,
                   env={"DIST_INFER_CACHE": str(cache)})
    assert_refused(proc, "model.gguf is not a GGUF file", "b'<htm'", "Download it again")
    assert not out.exists() and not cache.exists()  # nothing imported, not even a temporary directory
