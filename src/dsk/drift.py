"""Data drift between a reference artifact's training data and new data, for cron or CI.

Tables: per-feature population stability index (PSI, 10 reference-quantile bins) and the
two-sample Kolmogorov–Smirnov test, after replaying the reference's cleaning transform on the
new rows so both sides are in the same space. Text: Jensen–Shannon divergence of token
unigram distributions under the reference tokenizer, the rate of unknown bytes and of tokens
never seen in the reference training shards, and the shift of document lengths (KS).
A feature (or text statistic) past its threshold is flagged; the command exits 1 if any is.

    $ dsk drift --reference clean:latest --current data/new.csv
    $ dsk drift --reference featurize:latest --current data/new_corpus.txt --jsd-threshold 0.05
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsk.artifacts import Artifact, Store
from dsk.errors import DskError


@dataclass(frozen=True)
class Thresholds:
    psi: float = 0.2  # the usual rule of thumb: < 0.1 stable, 0.1–0.2 moderate, > 0.2 shifted
    ks_alpha: float = 0.01
    ks_min_statistic: float = 0.1  # large samples make tiny, harmless shifts "significant"
    jsd: float = 0.05
    unseen_token_rate: float = 0.02
    unknown_byte_rate: float = 0.01


def psi(reference: np.ndarray, current: np.ndarray, bins: int = 10) -> float:
    """Population stability index over reference-quantile bins (eps-smoothed)."""
    reference = reference[np.isfinite(reference)]
    current = current[np.isfinite(current)]
    if len(reference) == 0 or len(current) == 0:
        return float("nan")
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)))
    if len(edges) < 2:  # a constant reference column: compare "equal" vs "different"
        ref_frac = np.array([1.0, 0.0])
        cur_same = float(np.mean(np.isclose(current, edges[0])))
        cur_frac = np.array([cur_same, 1 - cur_same])
    else:
        inner = edges[1:-1]
        ref_frac = np.bincount(np.searchsorted(inner, reference, side="right"), minlength=len(edges) - 1) / len(reference)
        cur_frac = np.bincount(np.searchsorted(inner, current, side="right"), minlength=len(edges) - 1) / len(current)
    eps = 1e-4
    ref_frac = np.clip(ref_frac, eps, None)
    cur_frac = np.clip(cur_frac, eps, None)
    return float(np.sum((cur_frac - ref_frac) * np.log(cur_frac / ref_frac)))


def jensen_shannon(p: np.ndarray, q: np.ndarray) -> float:
    """JS divergence in bits (0 = identical, 1 = disjoint)."""
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        mask = a > 0
        return float(np.sum(a[mask] * np.log2(a[mask] / b[mask])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def _read_table(path: Path):
    import pandas as pd

    try:
        if path.suffix.lower() == ".parquet":
            return pd.read_parquet(path)
        return pd.read_csv(path)
    except Exception as exc:  # pandas raises many types for malformed files
        raise DskError(f"cannot read {str(path)!r} as a table: {str(exc).splitlines()[0]}") from None


def table_drift(reference: Artifact, current_path: Path, th: Thresholds) -> dict[str, Any]:
    import pandas as pd
    from scipy.stats import ks_2samp

    from dsk.data.table_transform import apply_transform, load_transform

    transform = load_transform(reference.path)
    ref = pd.read_parquet(reference.path / "data.parquet")
    cur_raw = _read_table(current_path)
    try:
        cur = apply_transform(cur_raw, transform, keep_label=False)
    except ValueError as exc:
        raise DskError(f"{current_path}: {exc}; the current data must have the reference's feature columns") from None
    features = [c for c in transform["numeric"] if c in ref.columns and c in cur.columns]
    rows = []
    for col in features:
        r = ref[col].to_numpy(dtype=float)
        c = cur[col].to_numpy(dtype=float)
        value = psi(r, c)
        ks = ks_2samp(r[np.isfinite(r)], c[np.isfinite(c)])
        drifted = (value >= th.psi) or (ks.pvalue < th.ks_alpha and ks.statistic >= th.ks_min_statistic)
        rows.append({"feature": col, "psi": round(value, 6), "ks_statistic": round(float(ks.statistic), 6),
                     "ks_pvalue": float(ks.pvalue), "drifted": bool(drifted)})
    extra = [c for c in cur_raw.columns if c not in transform["features"] and c != transform.get("label")]
    return {"kind": "table", "reference": reference.id, "current": str(current_path),
            "n_reference": int(len(ref)), "n_current": int(len(cur)), "features": rows,
            "extra_columns": extra, "drifted": [r["feature"] for r in rows if r["drifted"]]}


def _read_documents(path: Path) -> list[str]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            docs = []
            for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if line.strip():
                    try:
                        docs.append(str(json.loads(line)["text"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise DskError(f"{path}:{i}: expected a JSON object with a 'text' field") from None
            return docs
        if suffix == ".parquet":
            import pandas as pd

            return [str(t) for t in pd.read_parquet(path, columns=["text"])["text"]]
        text = path.read_text(encoding="utf-8", errors="replace")
    except UnicodeDecodeError:
        raise DskError(f"{path} is not UTF-8 text") from None
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def text_drift(reference: Artifact, current_path: Path, th: Thresholds) -> dict[str, Any]:
    from scipy.stats import ks_2samp
    from tokenizers import Tokenizer

    meta = json.loads((reference.path / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(reference.path / "tokenizer.json"))
    vocab = int(meta["vocab_size"])
    train = np.memmap(reference.path / "train.bin", dtype=np.dtype(meta["dtype"]), mode="r")
    ref_counts = np.bincount(np.asarray(train), minlength=vocab).astype(float)[:vocab]
    offsets = np.load(reference.path / "train_offsets.npy")
    ref_lengths = np.diff(offsets)

    docs = _read_documents(current_path) if current_path.is_file() else [
        d for f in sorted(current_path.rglob("*")) if f.is_file() for d in _read_documents(f)]
    if not docs:
        raise DskError(f"{current_path} holds no text documents")
    encodings = tokenizer.encode_batch(docs)
    cur_ids = np.concatenate([np.asarray(e.ids, dtype=np.int64) for e in encodings]) if encodings else np.zeros(0, np.int64)
    cur_counts = np.bincount(cur_ids, minlength=vocab).astype(float)[:vocab]
    cur_lengths = np.array([len(e.ids) for e in encodings])
    unk_token = tokenizer.model.unk_token if hasattr(tokenizer.model, "unk_token") else None
    unk_id = tokenizer.token_to_id(unk_token) if unk_token else None
    total_bytes = sum(len(d.encode("utf-8")) for d in docs)
    unknown_bytes = 0
    if unk_id is not None:
        for e in encodings:
            for tid, (start, end) in zip(e.ids, e.offsets):
                if tid == unk_id:
                    unknown_bytes += len(e.original_str[start:end].encode("utf-8")) if hasattr(e, "original_str") else end - start
    smooth = 1e-9
    jsd = jensen_shannon(ref_counts + smooth, cur_counts + smooth)
    unseen = float(cur_counts[ref_counts == 0].sum() / max(1, cur_counts.sum()))
    unknown_rate = unknown_bytes / max(1, total_bytes)
    ks = ks_2samp(ref_lengths, cur_lengths)
    stats = {
        "token_jsd_bits": {"value": round(jsd, 6), "threshold": th.jsd, "drifted": jsd >= th.jsd},
        "unseen_token_rate": {"value": round(unseen, 6), "threshold": th.unseen_token_rate, "drifted": unseen >= th.unseen_token_rate},
        "unknown_byte_rate": {"value": round(unknown_rate, 6), "threshold": th.unknown_byte_rate, "drifted": unknown_rate >= th.unknown_byte_rate},
        "length_ks": {"value": round(float(ks.statistic), 6), "pvalue": float(ks.pvalue),
                      "threshold": th.ks_alpha,
                      "drifted": bool(ks.pvalue < th.ks_alpha and ks.statistic >= th.ks_min_statistic)},
    }
    return {"kind": "text", "reference": reference.id, "current": str(current_path), "n_reference_docs": int(len(ref_lengths)),
            "n_current_docs": len(docs), "mean_tokens_reference": float(ref_lengths.mean()) if len(ref_lengths) else math.nan,
            "mean_tokens_current": float(cur_lengths.mean()), "statistics": stats,
            "drifted": [k for k, v in stats.items() if v["drifted"]]}


def run_drift(*, reference: str, current: str, thresholds: Thresholds = Thresholds(), out: str | Path = "drift.json",
              store: Store | None = None) -> dict[str, Any]:
    store = store or Store.open()
    ref_art = store.resolve(reference)
    current_path = Path(current)
    if not current_path.exists():
        raise DskError(f"current data {current!r} does not exist; check the path")
    table = store.nearest_ancestor(ref_art, {"table"})
    tokens = store.nearest_ancestor(ref_art, {"tokens"})
    if tokens is not None and current_path.suffix.lower() not in (".csv",) and (table is None or current_path.suffix.lower() in (".txt", ".jsonl") or current_path.is_dir()):
        result = text_drift(tokens, current_path, thresholds)
    elif table is not None:
        result = table_drift(table, current_path, thresholds)
    else:
        raise DskError(f"reference {reference!r} has no table (clean) or token (featurize) artifact in its lineage")
    Path(out).write_text(json.dumps(result, indent=2, default=float) + "\n")
    result["out"] = str(out)
    return result
