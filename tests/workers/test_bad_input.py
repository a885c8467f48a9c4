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


@pytest.mark.parametrize("args, words", [
    (["--stop", "x"], ["stop strings need a tokenizer"]),
    (["--max-new-tokens", "0"], ["max_new_tokens must be >= 1"]),
    (["--temperature", "1", "--top-p", "0"], ["top_p must be in (0, 1]"]),
    (["--temperature", "-1"], ["temperature must be >= 0"]),
], ids=["stop-without-tokenizer", "max-new-tokens-0", "top-p-0", "negative-temperature"])
def test_bad_request_options(engine1, tmp_path, args, words):
    prompts = write_prompts(tmp_path / "p.jsonl", [[1, 2, 3]])
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(prompts), *args, timeout=TIMEOUT)
    assert_clean_failure(proc, *words)


def test_missing_and_malformed_prompt_files(engine1, tmp_path):
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(tmp_path / "nope.jsonl"), timeout=TIMEOUT)
    assert_clean_failure(proc, "nope.jsonl does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input_ids": [1, 2]}\n{"input_ids": [1, "x"]}\n')
    proc = run_cli("run", "--engine", str(engine1), "--prompts-file", str(bad), timeout=TIMEOUT)
    assert_clean_failure(proc, "line 2", "input_ids")
