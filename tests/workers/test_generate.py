"""End-to-end generation through the real CLI: partition -> build -> `mpirun -n T*P dist-infer run`,
compared token for token with transformers' greedy `generate` (float32)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import build_in_process, completions, hf_greedy, make_tiny_model, run_cli, write_prompts

TIMEOUT = 240
ARCHS = ["llama", "mistral", "qwen2"]
LAYOUTS = [(1, 1), (2, 1), (4, 1), (1, 2), (2, 2)]
NEW = 16
VOCAB = 301  # conftest's tiny vocab


def _prompts(lengths, seed=1234):
    """Random token ids, never 0: conftest's hf_greedy passes pad_token_id=0 without an
    attention mask, so transformers would mask out a prompt token 0 in the reference."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=g).tolist() for n in lengths]


PROMPTS = _prompts([3, 9, 17])


class Engines:
    """Partition + build each (model, layout, build options) once per module, in this process
    (conftest.build_in_process: the CLI's own build handler, without a process start per engine;
    the sub-commands as processes are tested in tests/engine, tests/partition and
    tests/workers/test_bad_input.py; what this file tests is `run`)."""

    def __init__(self, root: Path):
        self.root = root
        self.ckpts: dict = {}
        self.engines: dict = {}

    def checkpoint(self, model_dir: Path, tp: int, pp: int) -> Path:
        key = (str(model_dir), tp, pp)
        if key not in self.ckpts:
            from dist_infer.partition import partition

            out = self.root / f"ckpt-{len(self.ckpts)}-{model_dir.name}-tp{tp}pp{pp}"
            partition(model_dir, tp, pp, out, progress=False)
            self.ckpts[key] = out
        return self.ckpts[key]

    def get(self, model_dir: Path, tp: int, pp: int, *build_args: str) -> Path:
        key = (str(model_dir), tp, pp, build_args)
        if key not in self.engines:
            out = self.root / f"engine-{len(self.engines)}-{model_dir.name}-tp{tp}pp{pp}"
            self.engines[key] = build_in_process(self.checkpoint(model_dir, tp, pp), out, *build_args)
        return self.engines[key]


@pytest.fixture(scope="module")
def engines(tmp_path_factory) -> Engines:
    return Engines(tmp_path_factory.mktemp("engines"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """arch -> (HF dir, float32 HF model); references are computed per prompt and cached."""
    root = tmp_path_factory.mktemp("tiny")
    return {arch: (root / arch, make_tiny_model(root / arch, arch)) for arch in ARCHS}


_REF_CACHE: dict = {}


def reference(tiny, arch: str, prompt: list[int], n: int) -> list[int]:
    key = (arch, tuple(prompt))
    if len(_REF_CACHE.get(key, [])) < n:
        _REF_CACHE[key] = hf_greedy(tiny[arch][1], prompt, max(n, NEW))
    return _REF_CACHE[key][:n]


def run_ids(engine: Path, prompts: list[list[int]], world: int, tmp_path: Path, *args: str, name="p.jsonl"):
    path = write_prompts(tmp_path / name, prompts)
    return completions(run_cli("run", "--engine", str(engine), "--prompts-file", str(path), "--json", *args,
                               world=world, timeout=TIMEOUT))


# ------------------------------------------------------- greedy == transformers

@pytest.mark.parametrize("tp,pp", LAYOUTS, ids=[f"tp{t}pp{p}" for t, p in LAYOUTS])
@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_matches_transformers(engines, tiny, arch, tp, pp, tmp_path):
    engine = engines.get(tiny[arch][0], tp, pp)
    outs = run_ids(engine, PROMPTS, tp * pp, tmp_path, "--max-new-tokens", str(NEW), "--ignore-eos")
    assert len(outs) == len(PROMPTS)
    for i, (c, prompt) in enumerate(zip(outs, PROMPTS)):
        assert c["index"] == i
        assert c["prompt_ids"] == prompt
        assert c["output_ids"] == reference(tiny, arch, prompt, NEW), f"prompt {i} (length {len(prompt)})"
        assert c["finish_reason"] == "length"
        assert c["text"] is None  # tiny models ship no tokenizer


def test_sliding_window_matches_transformers(engines, tiny, tmp_path):
    """Mistral with a window (5) shorter than the prompts: the paged attention's
    window mask must match transformers' (q - k < window)."""
    model_dir = tiny["mistral"][0].parent / "mistral-window5"
    model = make_tiny_model(model_dir, "mistral", sliding_window=5)
    refs = [hf_greedy(model, p, NEW) for p in PROMPTS]
    # The window changes transformers' own output (so this test exercises it).
    assert refs != [reference(tiny, "mistral", p, NEW) for p in PROMPTS]
    outs = run_ids(engines.get(model_dir, 2, 1), PROMPTS, 2, tmp_path, "--max-new-tokens", str(NEW), "--ignore-eos")
    assert [c["output_ids"] for c in outs] == refs


@pytest.mark.parametrize("n", [1, 5])
def test_max_new_tokens_respected(engines, tiny, n, tmp_path):
    engine = engines.get(tiny["llama"][0], 1, 2)
    outs = run_ids(engine, PROMPTS, 2, tmp_path, "--max-new-tokens", str(n), "--ignore-eos")
    assert len(outs) == len(PROMPTS)
    for c, prompt in zip(outs, PROMPTS):
        assert c["output_ids"] == reference(tiny, "llama", prompt, n)
        assert c["finish_reason"] == "length"


def test_eos_stops_generation(engines, tiny, tmp_path):
    """An engine whose config lists EOS ids that greedy decoding emits stops at the
    first of them (EOS included in the output, finish_reason "stop"); --ignore-eos
    runs on to max_new_tokens. Two EOS ids (a list, as Llama 3 configs have)."""
    refs = [reference(tiny, "llama", p, NEW) for p in PROMPTS]

    def first_new(ref, start, avoid=()):  # (step, token) first emitted at step >= start
        return next((i, ref[i]) for i in range(start, NEW) if ref[i] not in ref[:i] and ref[i] not in avoid)

    k0, eos0 = first_new(refs[0], 3)
    k1, eos1 = first_new(refs[1], 2, avoid=refs[0][: k0 + 1])
    eos_ids = [eos0, eos1]
    model_dir = tiny["llama"][0].parent / "llama-eos"
    eos_model = make_tiny_model(model_dir, "llama", eos_token_id=eos_ids)
    base = tiny["llama"][1].state_dict()
    assert all(torch.equal(t, base[n]) for n, t in eos_model.state_dict().items())  # same weights, new EOS
    engine = engines.get(model_dir, 2, 1)

    outs = run_ids(engine, PROMPTS, 2, tmp_path, "--max-new-tokens", str(NEW))
    assert len(outs) == len(PROMPTS)
    for c, ref in zip(outs, refs):
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos_ids), None)
        if cut is None:
            assert c["output_ids"] == ref and c["finish_reason"] == "length"
        else:
            assert c["output_ids"] == ref[:cut] and c["finish_reason"] == "stop"
    assert outs[0]["output_ids"] == refs[0][: k0 + 1] and outs[0]["finish_reason"] == "stop"
    assert len(outs[1]["output_ids"]) <= k1 + 1 and outs[1]["finish_reason"] == "stop"

    outs = run_ids(engine, PROMPTS, 2, tmp_path, "--max-new-tokens", str(NEW), "--ignore-eos")
    assert [c["output_ids"] for c in outs] == refs
    assert all(c["finish_reason"] == "length" for c in outs)


SAMPLING = ["--temperature", "0.8", "--top-k", "50", "--top-p", "0.9"]


def test_seeded_sampling_reproducible_across_runs_and_layouts(engines, tiny, tmp_path):
    llama = tiny["llama"][0]
    e_tp2, e_tp1 = engines.get(llama, 2, 1), engines.get(llama, 1, 1)
    common = ["--max-new-tokens", str(NEW), "--ignore-eos", *SAMPLING]
    a = [c["output_ids"] for c in run_ids(e_tp2, PROMPTS, 2, tmp_path, *common, "--seed", "7")]
    # Prompt i samples with seed 7 + i. A second run with a different batch (prompt 0 alone, then
    # prompt 2 alone as index 0 of a run seeded 9): the same tokens per (prompt, seed).
    b0 = run_ids(e_tp2, [PROMPTS[0]], 2, tmp_path, *common, "--seed", "7")[0]["output_ids"]
    b2 = run_ids(e_tp2, [PROMPTS[2]], 2, tmp_path, *common, "--seed", "9")[0]["output_ids"]
    assert [b0, b2] == [a[0], a[2]]
    # Planned in turn (each step after the last one's tokens are on the host), the same tokens: by
    # default the next step is queued first, its inputs sent from TP rank 0 to rank 1 on the device.
    in_turn = run_ids(e_tp2, PROMPTS, 2, tmp_path, *common, "--seed", "7", "--no-async-scheduling")
    assert [c["output_ids"] for c in in_turn] == a
    # Duplicate prompts in one run draw from their own streams: different samples.
    dup = [c["output_ids"] for c in run_ids(e_tp2, [PROMPTS[1]] * 2, 2, tmp_path, *common, "--seed", "7")]
    assert dup[0] != dup[1]
    # TP=1 gives the same sampled tokens as TP=2.
    c = [c["output_ids"] for c in run_ids(e_tp1, PROMPTS, 1, tmp_path, *common, "--seed", "7")]
    assert c == a
    # Sampling is not greedy, and another seed gives other tokens.
    greedy = [reference(tiny, "llama", p, NEW) for p in PROMPTS]
    assert a != greedy
    assert sum(x != y for s, g in zip(a, greedy) for x, y in zip(s, g)) >= 3
    d = [c["output_ids"] for c in run_ids(e_tp2, PROMPTS, 2, tmp_path, *common, "--seed", "8")]
    assert d != a
    assert all(0 <= t < VOCAB for seq in a + d for t in seq)


@pytest.mark.parametrize("depth,in_flight", [(None, 2), ("1", 1), ("3", 3)], ids=["default", "in-turn", "depth-3"])
def test_in_flight_batching_more_prompts_than_max_batch(engines, tiny, tmp_path, depth, in_flight):
    """--max-batch-size 2 with 5 prompts: sequences finish at different steps
    (max_new_tokens or the max_seq_len limit), waiting prompts are admitted into
    a running batch and reuse freed KV blocks; each still gets exactly its
    single-prompt reference tokens. With PP=2 the stages run two micro-batches
    of 2 sequences at once (pipelined PP); --pipeline-depth 1 runs them in turn,
    3 keeps a third micro-batch queued."""
    engine = engines.get(tiny["mistral"][0], 2, 2, "--max-batch-size", "2", "--max-seq-len", "32",
                         "--kv-block-size", "4")
    prompts = _prompts([3, 9, 25, 17, 12], seed=99)
    proc = run_cli("--log-level", "INFO", "run", "--engine", str(engine), "--prompts-file",
                   str(write_prompts(tmp_path / "p.jsonl", prompts)),
                   "--json", "--max-new-tokens", "20", "--ignore-eos", *(["--pipeline-depth", depth] if depth else []),
                   world=4, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"(at most {in_flight} in flight)" in proc.stderr, proc.stderr[-3000:]
    outs = completions(proc)
    assert len(outs) == 5
    for i, (c, p) in enumerate(zip(outs, prompts)):
        n = min(20, 32 - len(p))  # prompt + output fit in max_seq_len
        assert c["index"] == i and c["prompt_ids"] == p
        assert c["output_ids"] == reference(tiny, "mistral", p, n), f"prompt {i}"
        assert c["finish_reason"] == "length"


# --------------------------------------------------------------------- SmolLM2

SMOL_PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
                "Name three colors of the rainbow, please, and explain why the sky is blue."]
SMOL_NEW = 24


@pytest.fixture(scope="module")
def smol(smollm2_hf):
    """Chat-templated prompt ids and transformers' greedy reference, truncated after EOS."""
    model, tok = smollm2_hf
    eos = model.config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    out = []
    for text in SMOL_PROMPTS:
        ids = list(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                           tokenize=True, return_dict=True)["input_ids"])
        ref = hf_greedy(model, ids, SMOL_NEW)
        cut = next((i + 1 for i, t in enumerate(ref) if t in eos_ids), len(ref))
        out.append((ids, ref[:cut], "stop" if cut < len(ref) or ref[-1] in eos_ids else "length"))
    assert len({len(ids) for ids, _, _ in out}) == len(out)  # different prompt lengths
    return out, tok


def _check_smol(outs, smol):
    refs, tok = smol
    assert len(outs) == len(refs)
    for c, (ids, ref, reason) in zip(outs, refs):
        assert c["prompt_ids"] == ids
        assert c["output_ids"] == ref
        assert c["finish_reason"] == reason
        assert c["text"] == tok.decode(ref, skip_special_tokens=True)
    assert "Paris" in outs[0]["text"]


@pytest.mark.slow
@pytest.mark.parametrize("tp,pp,source", [(3, 1, "flags"), (1, 2, "textfile"), (3, 2, "jsonl")],
                         ids=["tp3pp1-flags", "tp1pp2-textfile", "tp3pp2-jsonl"])
def test_smollm2_greedy_matches_transformers(smollm2_engine, smol, tp, pp, source, tmp_path):
    engine = smollm2_engine(tp, pp)
    args = ["run", "--engine", str(engine), "--json", "--max-new-tokens", str(SMOL_NEW)]
    if source == "flags":
        for p in SMOL_PROMPTS:
            args += ["--prompt", p]
    elif source == "textfile":  # one prompt per line; blank lines are skipped
        f = tmp_path / "prompts.txt"
        f.write_text("\n".join(SMOL_PROMPTS[:1] + [""] + SMOL_PROMPTS[1:]) + "\n")
        args += ["--prompts-file", str(f)]
    else:
        f = tmp_path / "prompts.jsonl"
        f.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in SMOL_PROMPTS))
        args += ["--prompts-file", str(f)]
    outs = completions(run_cli(*args, world=tp * pp, timeout=TIMEOUT))
    _check_smol(outs, smol)


@pytest.mark.slow
def test_smollm2_prompts_from_stdin(smollm2_engine, smol):
    """`--prompts-file -`: one prompt per stdin line, read by a plain one-rank `dist-infer run`."""
    engine = smollm2_engine(1, 1)
    proc = run_cli("run", "--engine", str(engine), "--json", "--max-new-tokens", str(SMOL_NEW),
                   "--prompts-file", "-", input="\n".join(SMOL_PROMPTS) + "\n", timeout=TIMEOUT)
    _check_smol(completions(proc), smol)


def test_stdin_prompts_under_mpirun_are_refused_not_hung(smollm2_engine):
    """Open MPI 5 forwards stdin's data but never its end, so reading it would
    hang every rank: under mpirun `--prompts-file -` is refused at once."""
    engine = smollm2_engine(3, 1)
    proc = run_cli("run", "--engine", str(engine), "--prompts-file", "-", world=3, input="hello\n", timeout=TIMEOUT)
    assert proc.returncode != 0
    assert "cannot be used under mpirun" in proc.stderr and "--prompts-file FILE" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_smollm2_stop_strings_while_a_pipeline_runs_two_micro_batches(smollm2_engine, smol, tmp_path):
    """PP=2 with 12 prompts over a batch of 8: two micro-batches in flight. A stop string found in a
    step's text finishes its request while the request's next step is already launched (the ranks
    forget it with a later plan, and rank 0 still receives that step's tokens for it)."""
    refs, tok = smol
    ids, ref, _ = refs[1]
    full = tok.decode(ref, skip_special_tokens=True)
    stop = next(w for w in (w.strip(".,!?\n") for w in full.split()[3:]) if len(w) >= 3 and full.count(w) == 1)
    prompts = [refs[i % 3][0] for i in range(12)]
    proc = run_cli("--log-level", "INFO", "run", "--engine", str(smollm2_engine(1, 2)), "--json", "--max-new-tokens",
                   str(SMOL_NEW), "--prompts-file", str(write_prompts(tmp_path / "p.jsonl", prompts)), "--stop", stop,
                   world=2, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(at most 2 in flight)" in proc.stderr
    for i, c in enumerate(completions(proc)):
        text = tok.decode(refs[i % 3][1], skip_special_tokens=True)
        assert c["text"] == (text.split(stop)[0] if stop in text else text), f"prompt {i}"
        assert c["finish_reason"] == ("stop" if stop in text else refs[i % 3][2])
    assert sum(stop in tok.decode(refs[i % 3][1], skip_special_tokens=True) for i in range(12)) >= 4


def test_smollm2_stop_string(smollm2_engine, smol):
    """A stop string taken from the reference answer cuts the text before it and ends with "stop"."""
    refs, tok = smol
    ids, ref, _ = refs[1]
    full = tok.decode(ref, skip_special_tokens=True)
    words = [w.strip(".,!?\n") for w in full.split()]
    stop = next(w for w in words[3:] if len(w) >= 3 and full.count(w) == 1)
    engine = smollm2_engine(3, 1)
    outs = completions(run_cli("run", "--engine", str(engine), "--json", "--max-new-tokens", str(SMOL_NEW),
                               "--prompt", SMOL_PROMPTS[1], "--stop", stop, "--stop", "zzz-never-zzz",
                               world=3, timeout=TIMEOUT))
    (c,) = outs
    assert c["finish_reason"] == "stop"
    assert c["text"] == full[: full.index(stop)]
    assert stop not in c["text"]
    out_ids = c["output_ids"]
    assert out_ids == ref[: len(out_ids)] and len(out_ids) < len(ref)
    # The stop string's tokens are cut from output_ids as from the text: the ids are those
    # of the text before it, and the next reference token starts the stop string.
    assert tok.decode(out_ids, skip_special_tokens=True) == c["text"].rstrip(" ")
    assert stop.startswith(tok.decode(ref[len(out_ids)], skip_special_tokens=True).strip())
