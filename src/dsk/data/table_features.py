"""The fitted table transformation of `dsk featurize`, saved without pickle and replayable.

A `features` artifact holds ``transform/transform.json`` (every fitted step as plain JSON)
and ``transform/arrays.safetensors`` (the float64 arrays UMAP needs). :func:`apply_transform`
turns rows of a clean `table` artifact's ``data.parquet`` (or the same columns arriving at the
server) into exactly the feature columns the model was trained on:

1. encode: numeric columns as float (a missing value gets the training median), text
   columns one-hot against the training categories (unseen values → all zeros);
2. crosses: the kept products / safe ratios of numeric features and ANDs of indicators;
3. UMAP: the training split's embedding, extended to new rows by distance-weighted
   interpolation over their ``k`` nearest training rows (see :func:`umap_interpolate`);
4. selection: the columns RFECV kept.

Why not pickle UMAP: a pickled ``umap.UMAP`` (numba functions, pynndescent index) can run
arbitrary code when loaded and breaks across versions. We save the standardized training
inputs and their embedding instead; a training row maps back to its own embedding exactly,
and a new row to a weighted mean of its nearest training rows' embeddings, which is also
how UMAP itself initialises ``transform`` before refining.

    $ dsk featurize <table-artifact>
    >>> from dsk.data.table_features import load_transform, apply_transform
    >>> t = load_transform(".dsk/artifacts/featurize/<id>")
    >>> X = apply_transform(t, pd.read_parquet("data.parquet"))   # DataFrame, t.columns order
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsk.errors import DskError

TRANSFORM_DIR = "transform"
SPEC_FILE = "transform.json"
ARRAYS_FILE = "arrays.safetensors"
RATIO_EPS = 1.0  # ratios are a / (|b| + 1): inputs are robust-scaled, so b crosses zero


@dataclass
class TableTransform:
    spec: dict[str, Any]
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def columns(self) -> list[str]:
        """The output feature columns, in order."""
        return list(self.spec["selected"])

    @property
    def label_column(self) -> str:
        return self.spec["label_column"]

    @property
    def classes(self) -> list[Any]:
        return list(self.spec["classes"])

    @property
    def input_columns(self) -> list[str]:
        return [c["name"] for c in self.spec["inputs"]]


# --------------------------------------------------------------------------- steps


def one_hot_name(column: str, value: str) -> str:
    return f"{column}={value}"


def encode_inputs(spec: dict[str, Any], df: pd.DataFrame) -> pd.DataFrame:
    """Step 1: numeric columns as float64 (missing → training median), text columns one-hot."""
    missing = [c["name"] for c in spec["inputs"] if c["name"] not in df.columns]
    if missing:
        raise DskError(f"rows lack column {missing[0]!r} that the feature transform needs")
    out: dict[str, np.ndarray] = {}
    for col in spec["inputs"]:
        values = df[col["name"]]
        if col["type"] == "numeric":
            x = pd.to_numeric(values, errors="coerce").to_numpy(dtype=np.float64, na_value=np.nan)
            out[col["name"]] = np.where(np.isnan(x), col["fill"], x)
        else:
            as_text = values.astype("string").fillna("<missing>").to_numpy(dtype=object)
            for category in col["categories"]:
                out[one_hot_name(col["name"], category)] = (as_text == category).astype(np.float64)
    return pd.DataFrame(out, index=df.index)


def cross_values(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if op in ("product", "and"):
        return a * b
    if op == "ratio":
        return a / (np.abs(b) + RATIO_EPS)
    raise DskError(f"unknown cross op {op!r} in transform.json")


def add_crosses(spec: dict[str, Any], X: pd.DataFrame) -> pd.DataFrame:
    """Step 2: append each kept cross, in the order they were kept."""
    extra = {c["name"]: cross_values(c["op"], X[c["a"]].to_numpy(), X[c["b"]].to_numpy())
             for c in spec.get("crosses", [])}
    return pd.concat([X, pd.DataFrame(extra, index=X.index)], axis=1) if extra else X


def umap_interpolate(train_x: np.ndarray, train_embedding: np.ndarray, x: np.ndarray, k: int,
                     chunk: int = 512) -> np.ndarray:
    """Embed rows ``x`` from their ``k`` nearest training rows (Euclidean, standardized space).

    Weights are 1/distance; a row at distance 0 from training rows takes the mean of their
    embeddings, so training rows reproduce their fitted embedding exactly.
    """
    k = max(1, min(k, len(train_x)))
    out = np.empty((len(x), train_embedding.shape[1]), dtype=np.float64)
    train_sq = np.einsum("ij,ij->i", train_x, train_x)
    for start in range(0, len(x), chunk):
        block = x[start:start + chunk]
        d2 = np.einsum("ij,ij->i", block, block)[:, None] + train_sq[None, :] - 2.0 * block @ train_x.T
        np.maximum(d2, 0.0, out=d2)
        nn = np.argsort(d2, axis=1, kind="stable")[:, :k]
        # exact distances to the k candidates: the expansion above leaves ~1e-7 of rounding,
        # and a training row must find itself at distance exactly 0
        dist = np.sqrt(((block[:, None, :] - train_x[nn]) ** 2).sum(axis=2))
        for i in range(len(block)):
            exact = dist[i] == 0.0
            if exact.any():
                out[start + i] = train_embedding[nn[i][exact]].mean(axis=0)
            else:
                w = 1.0 / dist[i]
                out[start + i] = (w[:, None] * train_embedding[nn[i]]).sum(axis=0) / w.sum()
    return out


def umap_columns(n: int) -> list[str]:
    return [f"umap_{i}" for i in range(n)]


def add_umap(spec: dict[str, Any], arrays: dict[str, np.ndarray], X: pd.DataFrame) -> pd.DataFrame:
    """Step 3: UMAP components added to (or replacing) the features."""
    u = spec.get("umap")
    if not u:
        return X
    z = (X[u["input_columns"]].to_numpy(dtype=np.float64) - arrays["umap_mean"]) / arrays["umap_scale"]
    emb = umap_interpolate(arrays["umap_train_x"], arrays["umap_train_embedding"], z, u["k"])
    emb_df = pd.DataFrame(emb, index=X.index, columns=umap_columns(emb.shape[1]))
    return emb_df if u["mode"] == "replace" else pd.concat([X, emb_df], axis=1)


def apply_transform(transform: TableTransform, df: pd.DataFrame, *, upto: str = "select") -> pd.DataFrame:
    """Rows of a clean table (label optional) → the model's feature columns, in order.

    ``upto`` stops early ('encode', 'cross', 'umap') to get the candidate features.
    """
    spec, arrays = transform.spec, transform.arrays
    X = encode_inputs(spec, df)
    if upto == "encode":
        return X
    X = add_crosses(spec, X)
    if upto == "cross":
        return X
    X = add_umap(spec, arrays, X)
    if upto == "umap":
        return X
    return X[transform.columns]


def encode_labels(transform: TableTransform, labels: pd.Series) -> np.ndarray:
    """Labels → class indices 0..K-1 in ``spec['classes']`` order (unknown label: DskError)."""
    index = {str(c): i for i, c in enumerate(transform.classes)}
    keys = labels.astype("string").to_numpy(dtype=object)
    unknown = [k for k in keys if k not in index]
    if unknown:
        raise DskError(f"label value {unknown[0]!r} was not seen when the features were fitted")
    return np.array([index[k] for k in keys], dtype=np.int64)


# --------------------------------------------------------------------------- files


def save_transform(transform: TableTransform, artifact_dir: str | Path) -> Path:
    from safetensors.numpy import save_file

    d = Path(artifact_dir) / TRANSFORM_DIR
    d.mkdir(parents=True, exist_ok=True)
    (d / SPEC_FILE).write_text(json.dumps(transform.spec, indent=2, sort_keys=True, default=_json_default) + "\n")
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in sorted(transform.arrays.items())}
    save_file(arrays, str(d / ARRAYS_FILE))
    return d


def load_transform(path: str | Path) -> TableTransform:
    """From a `features` artifact directory (or its ``transform/`` folder)."""
    from safetensors.numpy import load_file

    d = Path(path)
    if (d / TRANSFORM_DIR).is_dir():
        d = d / TRANSFORM_DIR
    if not (d / SPEC_FILE).is_file():
        raise DskError(f"{str(path)!r} has no {TRANSFORM_DIR}/{SPEC_FILE}: not a featurize (table) artifact")
    spec = json.loads((d / SPEC_FILE).read_text())
    arrays = load_file(str(d / ARRAYS_FILE)) if (d / ARRAYS_FILE).is_file() else {}
    return TableTransform(spec, dict(arrays))


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
