"""Rank 0's input side: prompts from flags, files or stdin, tokenized with the
engine's tokenizer (chat template when the model has one)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from dist_infer.errors import RequestError

TOKENIZER_MARKERS = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def load_tokenizer(engine_dir: Path):
    """The tokenizer shipped in the engine directory, or None for token-id-only engines."""
    if not any((Path(engine_dir) / m).is_file() for m in TOKENIZER_MARKERS):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(engine_dir)


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str | list[int]]:
    """Text prompts, or token-id lists. A file is .jsonl ({"prompt": str} or
    {"input_ids": [int]} per line) or plain text (one prompt per line); '-' is stdin."""
    items: list[str | list[int]] = list(prompts)
    if prompts_file:
        if prompts_file == "-":
            from dist_infer.comm.bootstrap import launched_by_mpi

            if launched_by_mpi():
                # Open MPI 5's launcher forwards stdin's data but not its end: reading would hang.
                raise RequestError("--prompts-file - (stdin) cannot be used under mpirun, which does not forward "
                                   "the end of stdin; write the prompts to a file and pass --prompts-file FILE.")
            lines, jsonl = _decode(sys.stdin.buffer.read(), "stdin").splitlines(), False
        else:
            path = Path(prompts_file)
            if not path.is_file():
                raise RequestError(f"prompts file {path} does not exist.")
            lines, jsonl = _decode(path.read_bytes(), f"prompts file {path}").splitlines(), path.suffix == ".jsonl"
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue  # blank lines separate nothing: skipped, as the format says
            item = _parse_jsonl(line, n) if jsonl else line
            if isinstance(item, str) and not item.strip():
                raise RequestError(f"prompt {len(items)} (prompts file line {n}) is empty; give it some text or "
                                   "remove the line.")
            items.append(item)
    if not items:
        raise RequestError("no prompts: pass --prompt TEXT, --prompts-file FILE, or --prompts-file - for stdin.")
    return items


def _decode(data: bytes, what: str) -> str:
    """Prompts are UTF-8 text; say where a file in another encoding goes wrong."""
    try:
        return data.decode("utf-8-sig")  # -sig: a BOM (Windows editors) is not part of prompt 0
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise RequestError(f"{what} is not UTF-8 text (byte 0x{data[exc.start]:02x} on line {line}); convert it, "
                           "e.g. `iconv -f latin1 -t utf-8 FILE > FILE.utf8`, and pass that.") from None


def _parse_jsonl(line: str, n: int) -> str | list[int]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RequestError(f"prompts file line {n} is not JSON: {exc}") from exc
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str):
        return obj["prompt"]
    if isinstance(obj, dict) and isinstance(obj.get("input_ids"), list) and all(isinstance(t, int) for t in obj["input_ids"]):
        return obj["input_ids"]
    raise RequestError(f'prompts file line {n}: expected {{"prompt": "text"}} or {{"input_ids": [ints]}}.')


def tokenize(items: list[str | list[int]], tokenizer, chat_template: bool) -> list[list[int]]:
    out = []
    for item in items:
        if isinstance(item, list):
            out.append(item)
            continue
        if tokenizer is None:
            raise RequestError("this engine has no tokenizer, so prompts must be token ids "
                               '(a .jsonl prompts file with {"input_ids": [...]} lines).')
        if chat_template and tokenizer.chat_template:
            ids = tokenizer.apply_chat_template([{"role": "user", "content": item}], add_generation_prompt=True,
                                                tokenize=True, return_dict=True)["input_ids"]
        else:
            ids = tokenizer(item)["input_ids"]
        out.append(list(ids))
    return out


def generation_eos_ids(engine_dir: Path | None) -> set[int]:
    """EOS ids that only generation_config.json lists (Llama-3-Instruct ends a turn
    with <|eot_id|>, which its config.json does not name). None: an engine made in memory
    (bench's random-weight presets) has no such file."""
    if engine_dir is None:
        return set()
    path = Path(engine_dir) / "generation_config.json"
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return set()
    eos = eos if isinstance(eos, list) else [eos]
    return {int(t) for t in eos if isinstance(t, int)}
