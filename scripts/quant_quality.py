"""Quality of each `--quant` mode against the unquantized engine, on CPU, with real weights.

    .venv/bin/python scripts/quant_quality.py [--model DIR] [--text FILE] [--out DIR] [--json FILE]

Partitions SmolLM2-135M-Instruct (the embedded model; or --model DIR, a HF
safetensors directory) at TP=1, builds a float32 engine per mode with
`dist_infer.engine.build.build` (the code `dist-infer build` runs), and reports
per mode:
  - perplexity of the fixed text tests/data/quality_text.txt (one sequence,
    teacher-forced, every position) and its change against the unquantized engine;
  - top-1 agreement: the share of positions whose argmax next token equals the
    unquantized engine's;
  - whether the greedy answers (32 tokens, chat template) to the README's prompts
    are unchanged.
Quantized engines load here through StageModel with the engine's quantization,
as RankEngine does for one rank (engine/runtime.py).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from dist_infer.comm.base import LocalCommunicator
from dist_infer.config import BuildConfig
from dist_infer.engine.build import DTYPES, build, rank_weights_file
from dist_infer.engine.kv_cache import PagedKVCache, StepBatch
from dist_infer.engine.model import StageModel, local_heads
from dist_infer.engine.runtime import EngineSpec, RankEngine
from dist_infer.partition import partition

REPO = Path(__file__).resolve().parents[1]
README_PROMPTS = ["What is the capital of France?", "Hello", "Name three planets"]
# name -> BuildConfig options. SmolLM2's hidden size 576 is not a multiple of 128, so
# int4_wo runs with groups of 64 (`dist-infer build` refuses 128 and says so).
MODES = {"none": {}, "int8_wo": {"quant": "int8_wo"}, "fp8": {"quant": "fp8"},
         "int4_wo g64": {"quant": "int4_wo", "quant_group_size": 64},
         "int4_wo g32": {"quant": "int4_wo", "quant_group_size": 32}}
BLOCK = 16


class Engine:
    """One rank (TP=1, PP=1) of a built engine, with its own KV cache, prefill + greedy decode."""

    def __init__(self, directory: Path, max_tokens: int):
        spec = EngineSpec.read(directory)
        group = LocalCommunicator()
        self.model = StageModel(spec.model, spec.mapping, group, spec.vocab_size_padded, DTYPES[spec.build.dtype],
                                spec.build.quant_config)
        RankEngine._assign(SimpleNamespace(model=self.model, mapping=spec.mapping),
                           load_file(directory / rank_weights_file(0)))
        _, kv_heads = local_heads(spec.model, 1)
        self.blocks = -(-max_tokens // BLOCK) + 1
        self.cache = PagedKVCache(len(self.model.layer_ids), self.blocks, BLOCK, kv_heads, spec.model.head_dim,
                                  self.model.dtype)

    @torch.inference_mode()
    def logits(self, ids: list[int], start: int = 0, every_position: bool = False) -> torch.Tensor:
        """Run ids (positions start..) on the cached prefix; float32 logits [len(ids) or 1, vocab]."""
        batch = StepBatch.build([(ids, start, list(range(1, self.blocks)))], BLOCK)
        if every_position:
            batch.last_token_index = torch.arange(len(ids))
        return self.model.logits(self.model(batch.input_ids, batch, self.cache), batch)

    def greedy(self, prompt: list[int], new_tokens: int, eos: set[int]) -> list[int]:
        out = [int(self.logits(prompt)[0].argmax())]
        while len(out) < new_tokens and out[-1] not in eos:
            out.append(int(self.logits([out[-1]], len(prompt) + len(out) - 1)[0].argmax()))
        return out


def evaluate(directory: Path, text_ids: list[int], prompts: list[list[int]], eos: set[int], new_tokens: int):
    engine = Engine(directory, max(len(text_ids), max(map(len, prompts)) + new_tokens))
    logits = engine.logits(text_ids, every_position=True)  # [N, vocab]
    nll = F.cross_entropy(logits[:-1], torch.tensor(text_ids[1:]))
    answers = [engine.greedy(p, new_tokens, eos) for p in prompts]
    return math.exp(nll.item()), logits.argmax(-1), answers


def build_engines(model_dir: Path, out: Path) -> dict[str, Path]:
    ckpt = out / "ckpt"
    if not ckpt.exists():
        partition(model_dir, 1, 1, ckpt, progress=False)
    engines = {}
    for name, options in MODES.items():
        engines[name] = out / ("engine-" + name.replace(" ", "-"))
        if not engines[name].exists():
            build(ckpt, engines[name], BuildConfig(dtype="float32", max_seq_len=2048, **options), LocalCommunicator())
    return engines


def quality_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every quality script takes (also scripts/kv_fp8_quality.py)."""
    p = argparse.ArgumentParser(description=description.split("\n")[0])
    p.add_argument("--model", help="HF safetensors directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--text", default=str(REPO / "tests/data/quality_text.txt"))
    p.add_argument("--out", help="where the checkpoint and engines go (default: a temporary directory)")
    p.add_argument("--new-tokens", type=int, default=32)
    return p


def main() -> int:
    p = quality_parser(__doc__)
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    torch.manual_seed(0)
    from transformers import AutoTokenizer

    if args.model:
        model_dir = Path(args.model)
    else:
        from dist_infer.partition.sources import default_gguf_path, import_gguf

        model_dir = import_gguf(default_gguf_path())
    tok = AutoTokenizer.from_pretrained(model_dir)
    text_ids = tok(Path(args.text).read_text())["input_ids"]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                       return_dict=False) for q in README_PROMPTS]
    eos = {tok.eos_token_id}
    with tempfile.TemporaryDirectory() as tmp:
        engines = build_engines(model_dir, Path(args.out or tmp))
        results = {name: evaluate(path, text_ids, prompts, eos, args.new_tokens) for name, path in engines.items()}
    report(results, len(text_ids), decode=lambda a: tok.decode(a, skip_special_tokens=True), json_path=args.json)
    return 0


def report(results: dict, n_tokens: int, reference: str = "none", column: str = "mode", decode=lambda a: a,
           json_path: str | None = None) -> None:
    """The markdown table against `reference` (also scripts/kv_fp8_quality.py); answers through `decode`."""
    ppl0, top0, answers0 = results[reference]
    rows = []
    print(f"perplexity on {n_tokens} tokens; top-1 agreement over {n_tokens} positions; "
          f"greedy answers to {len(README_PROMPTS)} README prompts\n")
    print(f"| {column} | perplexity | vs {reference} | top-1 agreement | greedy answers unchanged |")
    print("|---|---:|---:|---:|---|")
    for name, (ppl, top, answers) in results.items():
        same = sum(a == b for a, b in zip(answers, answers0))
        row = dict(mode=name, perplexity=round(ppl, 3), change_pct=round(100 * (ppl / ppl0 - 1), 2),
                   top1_agreement=round((top == top0).float().mean().item(), 4), answers_unchanged=same,
                   answers=[decode(a) for a in answers])
        rows.append(row)
        print(f"| {name} | {ppl:.3f} | {row['change_pct']:+.2f} % | {100 * row['top1_agreement']:.1f} % | "
              f"{same}/{len(answers)} |")
    for row in rows:
        print(f"\n{row['mode']}:", *(f"\n  {q!r} -> {a!r}" for q, a in zip(README_PROMPTS, row["answers"])))
    if json_path:
        Path(json_path).write_text(json.dumps(rows, indent=1))

if __name__ == "__main__":
    sys.exit(main())
