"""Text track of `dsk featurize`: train (or reuse) a tokenizer, encode documents into shards.

Documents are split into train/val by a seeded permutation of documents (augmented copies
follow their source document, so no text leaks across the split). The tokenizer is trained
on the training split only, so bytes per token on val is an honest compression number.
Encoding runs `tokenizers`' batch encoder, which spreads every batch over all cores.

    $ dsk featurize --vocab-size 1024 --val-fraction 0.05
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsk import console
from dsk.artifacts import sha256_file
from dsk.data.shards import SPLITS, ShardWriter, dtype_for_vocab, open_split
from dsk.data.tokenizer import SPECIAL_TOKENS, Tokenizer, encode_pool, load_tokenizer, train_bpe, train_char
from dsk.errors import DskError
from dsk.runtime import StageContext

BATCH_BYTES = 4 << 20  # encode ~4 MB of text per batch: big enough to keep both cores busy
PARALLEL_MIN_CHARS = 8 << 20  # below this a worker pool costs more than it saves


def read_documents(path: Path) -> tuple[np.ndarray, list[Any], np.ndarray]:
    """(doc_id, text, split group) of a documents.parquet; augmented rows group by source."""
    if not path.is_file():
        raise DskError(f"{path.parent} has no documents.parquet; pass a clean or augment text artifact")
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise DskError(f"{path} has no 'text' column; it is not a text artifact")
    texts = table.column("text").to_pylist()
    doc_ids = (table.column("doc_id").to_numpy(zero_copy_only=False).astype(np.int64)
               if "doc_id" in table.column_names else np.arange(len(texts), dtype=np.int64))
    groups = doc_ids
    if "source_doc_id" in table.column_names:
        src = table.column("source_doc_id").to_pandas()
        groups = np.where(src.isna().to_numpy(), doc_ids, src.fillna(-1).to_numpy().astype(np.int64))
    return doc_ids, texts, groups


def split_documents(groups: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean val mask: a seeded random set of groups (documents) goes to validation."""
    unique = np.unique(groups)
    n_val = int(round(val_fraction * len(unique)))
    if val_fraction > 0 and len(unique) >= 2:
        n_val = min(max(n_val, 1), len(unique) - 1)
    rng = np.random.default_rng(seed)
    val_groups = unique[rng.permutation(len(unique))[:n_val]]
    return np.isin(groups, val_groups)


def train_tokenizer(ctx: StageContext, texts: list[str]) -> None:
    p = ctx.params
    out = ctx.out / "tokenizer.json"
    if p.tokenizer:
        source = ctx.extra_inputs[0]
        ctx.log.info(f"reusing tokenizer of {source.stage} {source.id}")
        out.write_bytes((source.path / "tokenizer.json").read_bytes())
        return
    started = time.perf_counter()
    with console.progress_task(f"training {p.tokenizer_type} tokenizer", None) as advance:
        if p.tokenizer_type == "char":
            hf = train_char(texts)
        else:
            hf = train_bpe(texts, vocab_size=p.vocab_size, min_frequency=p.min_frequency, length=len(texts))
        advance(0, status="done")
    Tokenizer(hf).save(out)
    ctx.log.info(f"trained {p.tokenizer_type} tokenizer: {hf.get_vocab_size()} tokens in "
                 f"{time.perf_counter() - started:.1f}s")


def unknown_bytes(tok: Tokenizer, texts: list[str], ids: list[list[int]]) -> int:
    """UTF-8 bytes of the text that the tokenizer could only map to its unknown token."""
    if tok.unk_id is None:
        return 0
    total = 0
    for text, doc_ids in zip(texts, ids):
        if tok.unk_id in doc_ids:
            enc = tok.hf.encode(text, add_special_tokens=False)
            total += sum(len(text[s:e].encode("utf-8"))
                         for i, (s, e) in zip(enc.ids, enc.offsets) if i == tok.unk_id)
    return total


def batch_bounds(texts: list[str], batch_chars: int) -> list[tuple[int, int]]:
    bounds, start = [], 0
    while start < len(texts):
        end, size = start, 0
        while end < len(texts) and (size < batch_chars or end == start):
            size += len(texts[end])
            end += 1
        bounds.append((start, end))
        start = end
    return bounds


def encode_workers(tok: Tokenizer, total_chars: int) -> int:
    """Processes for the ASCII fast path: every core, once the corpus is worth a spawn (~1 s)."""
    import os

    if not tok._fast_ascii or total_chars < PARALLEL_MIN_CHARS:
        return 1
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores, 16))


def encode_split(out: Path, tok: Tokenizer, split: str, texts: list[str], dtype: str,
                 advance=lambda n: None, pool=None) -> dict[str, Any]:
    """Encode ``texts`` in batches of ~BATCH_BYTES into ``out/<split>.bin`` + ``_offsets.npy``.

    With ``pool`` (from ``dsk.data.tokenizer.encode_pool``) the batches are encoded by worker
    processes, in order; without it, in this process (`tokenizers` still uses every core for
    non-ASCII text). benchmarks/featurize_encode.py times this function.
    """
    from dsk.data.tokenizer import _pool_encode

    n_bytes = unk = 0
    t0 = time.perf_counter()
    bounds = batch_bounds(texts, BATCH_BYTES if pool is None else BATCH_BYTES // 4)
    with ShardWriter(out, split, dtype, tok.eot_id) as writer:
        if pool is not None:
            encoded = pool.map(_pool_encode, [(texts[s:e], dtype) for s, e in bounds])
        else:
            encoded = (tok.encode_batch(texts[s:e]) for s, e in bounds)
        for (s, e), result in zip(bounds, encoded):
            if pool is not None:  # only byte-level BPE gets a pool (encode_workers): no unknown bytes
                writer.add_flat(*result)
            else:
                writer.add_many(result)
                unk += unknown_bytes(tok, texts[s:e], result)
            batch_bytes = sum(len(t.encode("utf-8")) for t in texts[s:e])
            n_bytes += batch_bytes
            advance(batch_bytes)
        n_tokens = writer.n_tokens
    return {"docs": len(texts), "tokens": n_tokens, "bytes": n_bytes, "unknown_bytes": unk,
            "encode_seconds": time.perf_counter() - t0}


def build_text(ctx: StageContext) -> None:
    p = ctx.params
    doc_ids, raw_texts, groups = read_documents(ctx.input.path / "documents.parquet")
    keep = np.array([isinstance(t, str) and len(t) > 0 for t in raw_texts], dtype=bool)
    rejects = pa.table({"doc_id": pa.array(doc_ids[~keep], pa.int64()),
                        "reason": pa.array(["empty or missing text"] * int((~keep).sum()), pa.string())})
    pq.write_table(rejects, ctx.out / "rejects.parquet")
    if not keep.any():
        raise DskError(f"{ctx.input.stage} {ctx.input.id} has no non-empty documents; check the clean step")
    if (~keep).any():
        ctx.log.warning(f"{int((~keep).sum())} empty documents skipped (see rejects.parquet)")
    doc_ids, groups = doc_ids[keep], groups[keep]
    texts: list[str] = [t for t, k in zip(raw_texts, keep) if k]

    is_val = split_documents(groups, p.val_fraction, ctx.seed)
    split_texts = {"train": [t for t, v in zip(texts, is_val) if not v],
                   "val": [t for t, v in zip(texts, is_val) if v]}
    ctx.log.info(f"{len(texts)} documents: {len(split_texts['train'])} train, {len(split_texts['val'])} val")

    train_tokenizer(ctx, split_texts["train"])
    tok = load_tokenizer(ctx.out / "tokenizer.json")
    dtype = dtype_for_vocab(tok.vocab_size)

    stats: dict[str, dict[str, Any]] = {}
    total_bytes = sum(len(t.encode("utf-8")) for t in texts)
    workers = encode_workers(tok, sum(len(t) for t in texts))
    pool = encode_pool(ctx.out / "tokenizer.json", workers) if workers > 1 else None
    try:
        with console.progress_task(f"encoding ({workers} process{'es' if workers > 1 else ''})",
                                   total_bytes) as advance:
            for split in SPLITS:
                stats[split] = encode_split(ctx.out, tok, split, split_texts[split], dtype, advance, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    encode_seconds = sum(s["encode_seconds"] for s in stats.values())
    mb_per_s = total_bytes / 1e6 / max(encode_seconds, 1e-9)
    ctx.log.info(f"encoded {total_bytes / 1e6:.2f} MB in {encode_seconds:.2f}s ({mb_per_s:.2f} MB/s)")

    meta = {
        "dtype": dtype,
        "vocab_size": tok.vocab_size,
        "special_tokens": tok.special,
        "eot_id": tok.eot_id,
        "tokenizer_type": tok.kind,
        "tokenizer_sha256": sha256_file(ctx.out / "tokenizer.json"),
        "n_train_tokens": stats["train"]["tokens"],
        "n_val_tokens": stats["val"]["tokens"],
        "n_train_docs": stats["train"]["docs"],
        "n_val_docs": stats["val"]["docs"],
        "train_bytes": stats["train"]["bytes"],
        "val_bytes": stats["val"]["bytes"],
    }
    (ctx.out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    def bytes_per_token(split: str) -> float | None:
        text_tokens = stats[split]["tokens"] - stats[split]["docs"]  # end-of-text ids carry no text
        return round(stats[split]["bytes"] / text_tokens, 4) if text_tokens > 0 else None

    def unk_rate(split: str) -> float:
        return round(stats[split]["unknown_bytes"] / stats[split]["bytes"], 6) if stats[split]["bytes"] else 0.0

    train_tokens = open_split(ctx.out, "train", meta=meta)
    counts = np.bincount(np.asarray(train_tokens), minlength=tok.vocab_size)
    order = np.argsort(-counts, kind="stable")[: p.top_tokens]
    top = [{"id": int(i), "text": tok.token_text(int(i)), "count": int(counts[i]),
            "share": round(float(counts[i]) / max(len(train_tokens), 1), 5)} for i in order if counts[i] > 0]
    eval_split = "val" if stats["val"]["docs"] else "train"
    report = {
        "tokenizer": {"type": tok.kind, "vocab_size": tok.vocab_size, "sha256": meta["tokenizer_sha256"],
                      "reused_from": ctx.extra_inputs[0].id if p.tokenizer else None,
                      "special_tokens": tok.special},
        "splits": {s: {k: stats[s][k] for k in ("docs", "tokens", "bytes", "unknown_bytes")} for s in SPLITS},
        "rejected_docs": int((~keep).sum()),
        "bytes_per_token_val": bytes_per_token(eval_split),
        "bytes_per_token_train": bytes_per_token("train"),
        "unknown_byte_rate_val": unk_rate(eval_split),
        "unknown_byte_rate_train": unk_rate("train"),
        "top_tokens": top,
        "dtype": dtype,
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    ctx.metrics.update({
        "vocab_size": tok.vocab_size,
        "tokenizer_type": tok.kind,
        "n_train_docs": meta["n_train_docs"],
        "n_val_docs": meta["n_val_docs"],
        "n_train_tokens": meta["n_train_tokens"],
        "n_val_tokens": meta["n_val_tokens"],
        "bytes_per_token_val": report["bytes_per_token_val"],
        "unknown_byte_rate_val": report["unknown_byte_rate_val"],
        "tokenizer_sha256": meta["tokenizer_sha256"],
        "encode_mb_per_s": round(mb_per_s, 3),
    })
    ctx.key_metric = "bytes_per_token_val"
    print_summary(report, mb_per_s)


def print_summary(report: dict[str, Any], mb_per_s: float) -> None:
    if console.is_quiet():
        return
    from rich.table import Table

    table = Table(title="featurize (text)", title_justify="left", show_header=False)
    table.add_column("", style="bold")
    table.add_column("")
    tk = report["tokenizer"]
    table.add_row("tokenizer", f"{tk['type']}, vocab {tk['vocab_size']}"
                  + (f", reused from {tk['reused_from']}" if tk["reused_from"] else ""))
    for split in SPLITS:
        s = report["splits"][split]
        table.add_row(split, f"{s['docs']:,} docs, {s['tokens']:,} tokens, {s['bytes']:,} bytes")
    table.add_row("bytes/token (val)", str(report["bytes_per_token_val"]))
    table.add_row("unknown-byte rate (val)", f"{report['unknown_byte_rate_val']:.4%}")
    table.add_row("encoding", f"{mb_per_s:.2f} MB/s")
    table.add_row("top tokens", "  ".join(f"{t['text']!r}×{t['count']}" for t in report["top_tokens"][:10]))
    console.console.print(table)


__all__ = ["build_text", "split_documents", "read_documents", "SPECIAL_TOKENS"]
