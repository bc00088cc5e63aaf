"""Text cleaning: read documents as a stream, normalise, filter, redact PII, deduplicate.

Pass 1 streams the input in batches through worker processes (normalise, quality filters,
PII, exact hash, near-dup fingerprint) and spills the normalised documents to a temporary
parquet file; only hashes and 8-byte fingerprints stay in memory. Dedup then runs on the
fingerprints, and pass 2 streams the spill into `documents.parquet` and `rejects.parquet`.

    $ dsk clean data/sample/tinyshakespeare.txt --split paragraph --pii
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import unicodedata
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from dsk import console
from dsk.clean import near_dup
from dsk.clean.params import Params
from dsk.errors import DskError

TEXT_SUFFIXES = {".txt", ".text", ".md", ".jsonl"}
BATCH = 2048

# Built-in PII patterns: placeholder type -> regex. Order matters: cards before phones.
DEFAULT_PII = {
    "EMAIL": r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    "IP": r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b",
    "CARD": r"\b(?:\d[ -]?){12,18}\d\b",
    "PHONE": r"(?<![\w.])(?:\+?\d{1,3}[ .-]?)?(?:\(\d{2,4}\)|\d{2,4})[ .-]?\d{3,4}[ .-]?\d{3,4}(?![\w.])",
}

DOC_SCHEMA = pa.schema([("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("line", pa.int64())])
REJECT_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("line", pa.int64()),
    ("reason", pa.string()), ("cluster_id", pa.int64()), ("kept_doc_id", pa.int64()),
])
SPILL_SCHEMA = pa.schema([
    ("doc_id", pa.int64()), ("text", pa.string()), ("source", pa.string()), ("line", pa.int64()), ("reason", pa.string()),
])

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\ufeff]")
_SPACES = re.compile(r"[ \t\u00a0\u2000-\u200a\u3000]+")
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalise(text: str) -> str:
    """NFC, Unix newlines, no control characters, single spaces, no trailing blanks."""
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
    text = _CONTROL.sub("", text)
    text = "\n".join(_SPACES.sub(" ", line).strip() for line in text.split("\n"))
    return _MANY_NEWLINES.sub("\n\n", text).strip()


def quality_reason(text: str, words: list[str], p: Params) -> str | None:
    """The first Gopher/C4-style rule the document breaks, or None if it passes them all."""
    n = len(words)
    if n == 0:
        return "empty"
    if n < p.min_words:
        return "too_few_words"
    if n > p.max_words:
        return "too_many_words"
    mean_len = sum(len(w) for w in words) / n
    if mean_len < p.min_mean_word_length:
        return "mean_word_length_low"
    if mean_len > p.max_mean_word_length:
        return "mean_word_length_high"
    symbols = text.count("#") + text.count("...") + text.count("…")
    if symbols / n > p.max_symbol_word_ratio:
        return "symbol_ratio"
    lines = [ln for ln in text.split("\n") if ln]
    if len(lines) > 1:
        seen: set[str] = set()
        dups = 0
        for ln in lines:
            dups += ln in seen
            seen.add(ln)
        if dups / len(lines) > p.max_dup_line_fraction:
            return "duplicate_lines"
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    if alpha / n < p.min_alpha_word_fraction:
        return "non_alphabetic"
    return None


def compile_pii(patterns: dict[str, str] | None) -> list[tuple[str, re.Pattern[str]]]:
    out = []
    for name, rx in (patterns or DEFAULT_PII).items():
        try:
            out.append((name.upper(), re.compile(rx)))
        except re.error as exc:
            raise DskError(f"pii_patterns: regex for {name!r} is invalid ({exc}); fix the pattern") from None
    return out


def redact(text: str, patterns: list[tuple[str, re.Pattern[str]]]) -> tuple[str, Counter[str]]:
    counts: Counter[str] = Counter()
    for name, rx in patterns:
        text, n = rx.subn(f"<{name}>", text)
        if n:
            counts[name] += n
    return text, counts


def exact_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


# --------------------------------------------------------------------------- worker


@dataclass
class BatchResult:
    texts: list[str]
    reasons: list[str | None]
    hashes: np.ndarray          # int64 exact hash per doc
    eligible: np.ndarray        # bool: takes part in near-dup detection
    fingerprints: np.ndarray    # uint64 [n, 1 or 2] SimHash, or uint64 [n, perms] MinHash signatures
    pii: Counter[str] = field(default_factory=Counter)


_worker_params: Params | None = None
_worker_pii: list[tuple[str, re.Pattern[str]]] = []


def _init_worker(params_json: str) -> None:
    global _worker_params, _worker_pii
    _worker_params = Params.model_validate_json(params_json)
    _worker_pii = compile_pii(_worker_params.pii_patterns) if _worker_params.pii else []


def process_batch(raw: list[tuple[str, str | None]]) -> BatchResult:
    """Normalise, filter, redact, hash and fingerprint one batch of (text, preset reason)."""
    p = _worker_params
    assert p is not None
    texts, reasons = [], []
    hashes = np.zeros(len(raw), np.int64)
    eligible = np.zeros(len(raw), bool)
    pii: Counter[str] = Counter()
    for i, (text, preset) in enumerate(raw):
        if preset is not None:
            texts.append(text)
            reasons.append(preset)
            continue
        text = normalise(text)
        if _worker_pii:
            text, counts = redact(text, _worker_pii)
            pii.update(counts)
        words = text.split()
        reason = quality_reason(text, words, p)
        texts.append(text)
        reasons.append(reason)
        if reason is None:
            hashes[i] = exact_hash(text)
            eligible[i] = p.near_dup and len(near_dup.words_of(text)) >= p.near_dup_min_words
    chosen = [texts[i] for i in np.nonzero(eligible)[0]]
    if p.method == "minhash":
        fps = np.zeros((len(raw), p.minhash_perms), np.uint64)
        if chosen:
            fps[eligible] = near_dup.minhash_signatures(chosen, p.shingle_size, p.minhash_perms)
    else:
        n_fp = 1 if p.simhash_verify is None else 2
        fps = np.zeros((len(raw), n_fp), np.uint64)
        if chosen:
            fps[eligible] = near_dup.simhash_fingerprints(chosen, p.shingle_size, n_fp)
    return BatchResult(texts, reasons, hashes, eligible, fps, pii)


# --------------------------------------------------------------------------- reading


@dataclass
class FileReport:
    documents: int = 0
    invalid_utf8_lines: int = 0
    skipped: str | None = None


def text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(f for f in path.rglob("*") if f.is_file() and not f.name.startswith("."))


def _looks_binary(f: Path) -> bool:
    with open(f, "rb") as fh:
        head = fh.read(8192)
    return b"\x00" in head


def _decode(line: bytes, rep: FileReport) -> str:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        rep.invalid_utf8_lines += 1
        return line.decode("utf-8", errors="replace")


def iter_documents(files: list[Path], root: Path, p: Params, reports: dict[str, FileReport]
                   ) -> Iterator[tuple[str, int, str, str | None]]:
    """Yield (source, line, raw text, preset reason) for every document of every file."""
    for f in files:
        name = str(f.relative_to(root)) if f != root else f.name
        rep = reports.setdefault(name, FileReport())
        suffix = f.suffix.lower()
        if f.stat().st_size == 0:
            rep.skipped = "empty file"
            continue
        if suffix == ".parquet":
            yield from _iter_parquet(f, name, p, rep)
            continue
        if suffix not in TEXT_SUFFIXES:
            rep.skipped = f"unsupported file type {suffix or '(none)'}"
            continue
        if _looks_binary(f):
            rep.skipped = "binary file (NUL bytes)"
            continue
        if suffix == ".jsonl":
            yield from _iter_jsonl(f, name, p, rep)
        else:
            yield from _iter_txt(f, name, p, rep)


def _iter_txt(f: Path, name: str, p: Params, rep: FileReport) -> Iterator[tuple[str, int, str, str | None]]:
    with open(f, "rb") as fh:
        if p.split == "file":
            rep.documents += 1
            yield name, 1, _decode(fh.read(), rep), None
            return
        para: list[str] = []
        start = 0
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, rep).rstrip("\r\n")
            if p.split == "line":
                if line.strip():
                    rep.documents += 1
                    yield name, lineno, line, None
                continue
            if line.strip():
                if not para:
                    start = lineno
                para.append(line)
            elif para:
                rep.documents += 1
                yield name, start, "\n".join(para), None
                para = []
        if para:
            rep.documents += 1
            yield name, start, "\n".join(para), None


def _iter_jsonl(f: Path, name: str, p: Params, rep: FileReport) -> Iterator[tuple[str, int, str, str | None]]:
    with open(f, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _decode(raw, rep).strip()
            if not line:
                continue
            rep.documents += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield name, lineno, line, "invalid_json"
                continue
            value = obj.get(p.text_field) if isinstance(obj, dict) else None
            if not isinstance(value, str):
                yield name, lineno, line, "missing_text_field"
                continue
            yield name, lineno, value, None


def _iter_parquet(f: Path, name: str, p: Params, rep: FileReport) -> Iterator[tuple[str, int, str, str | None]]:
    try:
        pf = pq.ParquetFile(f)
    except Exception as exc:  # pyarrow raises several types for a corrupt file
        rep.skipped = f"unreadable parquet ({exc.__class__.__name__})"
        return
    if p.text_field not in pf.schema_arrow.names:
        rep.skipped = f"no {p.text_field!r} column"
        return
    row = 0
    for batch in pf.iter_batches(columns=[p.text_field], batch_size=BATCH):
        for value in batch.column(0).to_pylist():
            row += 1
            rep.documents += 1
            if isinstance(value, str):
                yield name, row, value, None
            else:
                yield name, row, "" if value is None else str(value), "missing_text_field"


# --------------------------------------------------------------------------- the stage


def _batches(it: Iterator[tuple[str, int, str, str | None]], size: int) -> Iterator[list[tuple[str, int, str, str | None]]]:
    batch = []
    for item in it:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def clean_text(ctx: Any, path: Path) -> dict[str, Any]:
    p: Params = ctx.params
    files = text_files(path)
    root = path if path.is_dir() else path.parent
    reports: dict[str, FileReport] = {}
    workers = p.workers or os.cpu_count() or 1
    spill_path = ctx.out / ".spill.parquet"
    pii_counts: Counter[str] = Counter()
    hashes: list[np.ndarray] = []
    eligible: list[np.ndarray] = []
    passed_parts: list[np.ndarray] = []
    fps: list[np.ndarray] = []
    n_docs = 0
    input_chars = 0
    total_bytes = sum(f.stat().st_size for f in files)

    def raw_batches():
        for batch in _batches(iter_documents(files, root, p, reports), BATCH):
            yield batch

    params_json = p.model_dump_json()
    pool = None
    if workers > 1:
        import multiprocessing as mp

        # fork keeps start-up cheap; workers only read their batch and return arrays
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = mp.get_context(method).Pool(workers, initializer=_init_worker, initargs=(params_json,))
    else:
        _init_worker(params_json)
    writer = pq.ParquetWriter(spill_path, SPILL_SCHEMA)

    def results():
        # a bounded window of batches in flight: Pool.imap would read the whole input ahead
        in_flight: deque = deque()
        for batch in raw_batches():
            payload = [(text, preset) for _, _, text, preset in batch]
            if pool is None:
                yield batch, process_batch(payload)
                continue
            in_flight.append((batch, pool.apply_async(process_batch, (payload,))))
            if len(in_flight) >= 2 * workers:
                done, res = in_flight.popleft()
                yield done, res.get()
        while in_flight:
            done, res = in_flight.popleft()
            yield done, res.get()

    try:
        with console.progress_task("clean: fingerprint", total_bytes or None) as advance:
            for batch, res in results():
                ids = np.arange(n_docs, n_docs + len(batch), dtype=np.int64)
                n_docs += len(batch)
                input_chars += sum(len(t) for t in res.texts)
                writer.write_table(pa.table({
                    "doc_id": ids, "text": res.texts, "source": [b[0] for b in batch],
                    "line": np.array([b[1] for b in batch], np.int64), "reason": res.reasons,
                }, schema=SPILL_SCHEMA))
                hashes.append(res.hashes)
                passed_parts.append(np.array([r is None for r in res.reasons], bool))
                eligible.append(res.eligible)
                fps.append(res.fingerprints)
                pii_counts.update(res.pii)
                advance(sum(len(b[2].encode()) for b in batch), status=f"{n_docs:,} docs")
    finally:
        writer.close()
        if pool is not None:
            pool.close()
            pool.join()

    for name, rep in reports.items():
        if rep.skipped:
            ctx.log.warning(f"{name}: skipped ({rep.skipped})")
        if rep.invalid_utf8_lines:
            ctx.log.warning(f"{name}: {rep.invalid_utf8_lines} line(s) of invalid UTF-8 (replaced with U+FFFD)")
    if n_docs == 0:
        spill_path.unlink(missing_ok=True)
        why = "; ".join(f"{k}: {v.skipped}" for k, v in reports.items() if v.skipped) or "no documents"
        raise DskError(f"no documents in {str(path)!r} ({why}); give a non-empty .txt/.jsonl/.parquet text input")

    # ---- decide: filters were applied in pass 1; now exact and near duplicates
    passed = np.concatenate(passed_parts)
    hash_arr = np.concatenate(hashes)
    elig_arr = np.concatenate(eligible)
    fp_arr = np.concatenate(fps)
    rep_of = np.arange(n_docs, dtype=np.int64)     # kept representative of each document
    reason_of: dict[int, str] = {}
    passing_ids = np.nonzero(passed)[0]
    if p.dedup and passing_ids.size:
        _, first_idx, inverse = np.unique(hash_arr[passing_ids], return_index=True, return_inverse=True)
        # np.unique's first index is the first occurrence in doc order, so the earliest copy is kept
        first = passing_ids[first_idx][inverse]
        rep_of[passing_ids] = first
        for d in passing_ids[first != passing_ids]:
            reason_of[int(d)] = "exact_duplicate"
    uf = near_dup.UnionFind(n_docs)
    n_pairs = 0
    if p.near_dup:
        cand = np.nonzero(passed & elig_arr & (rep_of == np.arange(n_docs)))[0]
        if cand.size > 1:
            with console.progress_task(f"clean: near-dup ({p.method})", None) as advance:
                if p.method == "minhash":
                    local = near_dup.minhash_pairs(fp_arr[cand], p.minhash_threshold, p.minhash_perms)
                else:
                    local = near_dup.simhash_pairs(fp_arr[cand, 0], p.simhash_k, p.blocks, threads=workers)
                    if p.simhash_verify is not None:
                        local = near_dup.verify_pairs(local, fp_arr[cand], p.simhash_verify)
                advance(1, status=f"{len(local):,} pairs")
            n_pairs = len(local)
            uf.union_pairs(cand[local])
    # final representative: the cluster root (smallest doc id) of the exact representative
    final_rep = np.array([uf.find(int(r)) for r in rep_of], dtype=np.int64) if n_pairs else rep_of
    for d in np.nonzero(passed & (final_rep != np.arange(n_docs)))[0]:
        reason_of.setdefault(int(d), "near_duplicate")
    cluster_sizes = Counter(Counter(final_rep[passed].tolist()).values())
    cluster_sizes.pop(1, None)

    # ---- pass 2: stream the spill into documents and rejects
    docs_writer = pq.ParquetWriter(ctx.out / "documents.parquet", DOC_SCHEMA)
    rej_writer = pq.ParquetWriter(ctx.out / "rejects.parquet", REJECT_SCHEMA)
    counts: Counter[str] = Counter()
    kept_chars = 0
    try:
        for batch in pq.ParquetFile(spill_path).iter_batches(batch_size=8192):
            cols = batch.to_pydict()
            keep_rows: dict[str, list] = {k: [] for k in DOC_SCHEMA.names}
            rej_rows: dict[str, list] = {k: [] for k in REJECT_SCHEMA.names}
            for doc_id, text, source, line, reason in zip(cols["doc_id"], cols["text"], cols["source"], cols["line"], cols["reason"]):
                reason = reason or reason_of.get(doc_id)
                if reason is None:
                    for k, v in zip(DOC_SCHEMA.names, (doc_id, text, source, line)):
                        keep_rows[k].append(v)
                    kept_chars += len(text)
                    counts["kept"] += 1
                    continue
                counts[reason] += 1
                dup = reason in ("exact_duplicate", "near_duplicate")
                for k, v in zip(REJECT_SCHEMA.names, (doc_id, text, source, line, reason,
                                                      int(final_rep[doc_id]) if dup else -1,
                                                      int(final_rep[doc_id]) if dup else -1)):
                    rej_rows[k].append(v)
            docs_writer.write_table(pa.table(keep_rows, schema=DOC_SCHEMA))
            rej_writer.write_table(pa.table(rej_rows, schema=REJECT_SCHEMA))
    finally:
        docs_writer.close()
        rej_writer.close()
        spill_path.unlink(missing_ok=True)

    kept = counts.pop("kept", 0)
    report = {
        "kind": "text",
        "input_documents": n_docs,
        "kept_documents": kept,
        "rejected_documents": n_docs - kept,
        "rejects_by_reason": dict(sorted(counts.items())),
        "input_chars": input_chars,
        "kept_chars": kept_chars,
        "kept_char_fraction": round(kept_chars / input_chars, 6) if input_chars else 0.0,
        "near_dup_method": p.method if p.near_dup else None,
        "near_dup_pairs": n_pairs,
        "duplicate_cluster_sizes": {str(k): v for k, v in sorted(cluster_sizes.items())},
        "pii_redactions": dict(sorted(pii_counts.items())),
        "files": {k: {"documents": v.documents, "invalid_utf8_lines": v.invalid_utf8_lines, "skipped": v.skipped}
                  for k, v in sorted(reports.items())},
    }
    return report
