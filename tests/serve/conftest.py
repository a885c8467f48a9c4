"""Fixtures shared by the serve tests: one tiny random Llama (with SmolLM2's tokenizer,
so text works) built once per session per layout, and that tokenizer."""

from __future__ import annotations

import shutil

import pytest

from conftest import build_in_process, make_tiny_model

VOCAB = 301
BLOCK = 4
MAX_SEQ = 128


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, smollm2_dir):
    """(engine dir builder, HF reference model). One directory per session, so that the launcher
    tests that import this fixture reuse the engines built here."""
    root = tmp_path_factory.getbasetemp() / "tiny-serve"
    root.mkdir(exist_ok=True)
    model = make_tiny_model(root / "hf", "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).is_file():
            shutil.copy(smollm2_dir / name, root / "hf" / name)

    def engine(tp: int, pp: int):
        from dist_infer.partition import partition

        out = root / f"engine-tp{tp}pp{pp}"
        if not out.exists():
            partition(root / "hf", tp, pp, root / f"ckpt-tp{tp}pp{pp}", progress=False)
            build_in_process(root / f"ckpt-tp{tp}pp{pp}", out, "--max-batch-size", "8", "--max-seq-len", str(MAX_SEQ),
                             "--kv-block-size", str(BLOCK))
        return out

    return engine, model


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)
