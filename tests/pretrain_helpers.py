"""Test helper: a small `tokens` artifact in featurize's layout (docs/writing-a-stage.md).

The real `dsk featurize` lands separately; this writes the same files (tokenizer.json,
train.bin/val.bin, offsets, meta.json) through run_stage so that `dsk pretrain` picks it up
as the latest featurize artifact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dsk.artifacts import hash_raw_input
from dsk.config import StageParams
from dsk.runtime import run_stage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "tinyshakespeare.txt"


def byte_bpe_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


def make_tokens_artifact(*, chars: int = 60_000, vocab_size: int = 300, dtype: str = "uint16",
                         val_fraction: float = 0.1, meta_overrides: dict | None = None, source: Path = SAMPLE):
    text = source.read_text()[:chars]
    docs = [d for d in text.split("\n\n") if d.strip()]
    n_val = max(1, int(len(docs) * val_fraction)) if val_fraction > 0 else 0
    splits = {"train": docs[: len(docs) - n_val], "val": docs[len(docs) - n_val:]}

    def build(ctx):
        tok = byte_bpe_tokenizer(splits["train"], vocab_size)
        eot = tok.token_to_id("<|endoftext|>")
        tok.save(str(ctx.out / "tokenizer.json"))
        meta = {"dtype": dtype, "vocab_size": tok.get_vocab_size(), "special_tokens": {"<|endoftext|>": eot}}
        for split, split_docs in splits.items():
            ids, offsets = [], [0]
            for enc in tok.encode_batch(split_docs):
                ids.extend(enc.ids + [eot])
                offsets.append(len(ids))
            np.asarray(ids, dtype=dtype).tofile(ctx.out / f"{split}.bin")
            np.save(ctx.out / f"{split}_offsets.npy", np.asarray(offsets, dtype=np.int64))
            meta[f"n_{split}_tokens"] = len(ids)
            meta[f"{split}_bytes"] = sum(len(d.encode()) for d in split_docs)
        meta["tokenizer_sha256"] = hashlib.sha256((ctx.out / "tokenizer.json").read_bytes()).hexdigest()
        meta.update(meta_overrides or {})
        (ctx.out / "meta.json").write_text(json.dumps(meta, indent=2))
        ctx.kind = "tokens"

    class P(StageParams):
        chars: int
        vocab_size: int
        dtype: str
        val_fraction: float
        overrides: str

    params = P(chars=chars, vocab_size=vocab_size, dtype=dtype, val_fraction=val_fraction,
               overrides=json.dumps(meta_overrides or {}, sort_keys=True))
    return run_stage(stage="featurize", params=params, inputs=[hash_raw_input(source)], build=build).artifact
