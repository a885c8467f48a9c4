"""A rank that dies mid-generation must take the whole job down quickly: no
surviving rank may sit forever in a collective waiting for it."""

from __future__ import annotations


import pytest

from conftest import kill_rank_mid_run, make_tiny_model, run_cli, write_prompts

EXIT_DEADLINE_S = 10


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    from dist_infer.partition import partition

    root = tmp_path_factory.mktemp("failure")
    make_tiny_model(root / "hf", "llama", num_hidden_layers=8)
    partition(root / "hf", 2, 2, root / "ckpt", progress=False)
    proc = run_cli("build", "--checkpoint", str(root / "ckpt"), "--out", str(root / "engine"), "--max-seq-len", "256")
    assert proc.returncode == 0, proc.stderr
    return root / "engine", write_prompts(root / "p.jsonl", [[5, 6, 7]] * 4)


@pytest.mark.parametrize("victim", [2, 0])
def test_killed_rank_ends_the_job(engine, victim):
    """SIGKILL rank `victim` (a later-stage worker, or rank 0 the coordinator) while
    the job decodes: mpirun and every other rank exit within EXIT_DEADLINE_S, non-zero."""
    engine_dir, prompts = engine
    args = ["run", "--engine", str(engine_dir), "--prompts-file", str(prompts), "--max-new-tokens", "250",
            "--ignore-eos", "--json"]
    code, took, survivors = kill_rank_mid_run(args, 4, victim, EXIT_DEADLINE_S)
    assert code != 0, "a job that lost a rank must not report success"
    assert not survivors, f"ranks {survivors} outlived the job"
    print(f"rank {victim} killed: job exited with {code} after {took:.2f}s")
