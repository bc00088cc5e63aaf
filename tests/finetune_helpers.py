"""Tiny fixtures for the finetune tests: a char-level tokenizer, a random tiny base model
artifact (committed through the real runtime as a `pretrain` artifact), and JSONL writers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsk.artifacts import Store
from dsk.config import StageParams
from dsk.runtime import run_stage

@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: on a busy 2-core machine two threads mostly wait on each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class BaseParams(StageParams):
    preset: str = "tiny"
    max_seq_len: int = 64
    tokenizer: bool = True
    seed: int = 0
    arch: dict = {}


REPO = Path(__file__).resolve().parents[1]
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 :+-"


def char_tokenizer():
    from dsk.data.tokenizer import Tokenizer, train_char

    return Tokenizer(train_char([ALPHABET]))


def tiny_model(tok, *, preset: str = "tiny", max_seq_len: int = 64, seed: int = 0, **arch):
    import torch

    from dsk.models import ModelConfig, Transformer

    torch.manual_seed(seed)
    return Transformer(ModelConfig.preset(preset, vocab_size=tok.vocab_size, max_seq_len=max_seq_len, **arch))


def make_base(store: Store, *, preset: str = "tiny", max_seq_len: int = 64, tokenizer: bool = True, seed: int = 0,
              kind: str = "model", **arch):
    """A committed `pretrain` artifact holding a random tiny model (+ tokenizer)."""
    from dsk.models import save_model

    tok = char_tokenizer()

    def build(ctx):
        model = tiny_model(tok, preset=preset, max_seq_len=max_seq_len, seed=seed, **arch)
        save_model(model, ctx.out, tokenizer=tok if tokenizer else None)
        ctx.kind = kind

    params = BaseParams(preset=preset, max_seq_len=max_seq_len, tokenizer=tokenizer, seed=seed, arch=arch)
    return run_stage(stage="pretrain", params=params, inputs=[], build=build, store=store, kind=kind).artifact


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def copy_rows(n: int = 40) -> list[dict]:
    """Tiny checkable instruction rows: copy two letters."""
    import random

    rng = random.Random(0)
    rows = []
    for _ in range(n):
        w = "".join(rng.choice("abcdef") for _ in range(3))
        rows.append({"prompt": f"copy: {w}", "response": w})
    return rows


def preference_rows(n: int = 32) -> list[dict]:
    import random

    rng = random.Random(1)
    rows = []
    for _ in range(n):
        a, b = rng.randint(0, 4), rng.randint(0, 4)
        rows.append({"prompt": f"add: {a}+{b}", "chosen": str(a + b), "rejected": str(a + b + 1)})
    return rows
