"""Replay a fitted table transform (imputation, clipping, robust scaling) on new rows.

`dsk clean` fits the transform on the training table and saves it as `transform.json`; later
stages and the server call :func:`apply_transform` so new rows get exactly the same treatment,
without importing the clean stage. Pure numpy/pandas, no pickles.

    >>> from dsk.data.table_transform import load_transform, apply_transform
    >>> t = load_transform(".dsk/artifacts/clean/<id>/transform.json")
    >>> X = apply_transform(new_rows_dataframe, t)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

TRANSFORM_VERSION = 1


def load_transform(path: str | Path) -> dict[str, Any]:
    """Read a `transform.json` (or the artifact directory holding it)."""
    p = Path(path)
    if p.is_dir():
        p = p / "transform.json"
    data = json.loads(p.read_text())
    if data.get("version") != TRANSFORM_VERSION:
        raise ValueError(f"{p}: transform version {data.get('version')!r} is not {TRANSFORM_VERSION}")
    return data


def impute_iterative(X: np.ndarray, spec: dict[str, Any]) -> np.ndarray:
    """Replay IterativeImputer's fitted chain of linear regressions, pooled over imputations.

    Each imputation starts from the column means and walks its saved sequence of
    (target column, input columns, coef, intercept) steps, overwriting only the cells that
    were missing; the pooled value is the mean over imputations. This is the posterior-mean
    prediction, so replay is deterministic (fitting used posterior samples).
    """
    missing = np.isnan(X)
    if not missing.any():
        return X
    lo, hi = np.asarray(spec["min"], float), np.asarray(spec["max"], float)
    pooled = np.zeros_like(X)
    for imputation in spec["imputations"]:
        Xi = np.where(missing, np.asarray(imputation["initial"], float)[None, :], X)
        for step in imputation["steps"]:
            target = step["target"]
            rows = missing[:, target]
            if not rows.any():
                continue
            pred = Xi[np.ix_(rows, step["inputs"])] @ np.asarray(step["coef"], float) + step["intercept"]
            Xi[rows, target] = np.clip(pred, lo[target], hi[target])
        pooled += Xi
    return np.where(missing, pooled / len(spec["imputations"]), X)


def apply_transform(frame: pd.DataFrame, transform: dict[str, Any], *, keep_label: bool = True) -> pd.DataFrame:
    """Rows in, cleaned features (+ the label if present and ``keep_label``) out, in training order."""
    features = transform["features"]
    absent = [c for c in features if c not in frame.columns]
    if absent:
        raise ValueError(f"missing feature column(s): {', '.join(absent)}")
    out = frame[features].copy()
    numeric = transform["numeric"]
    for col in numeric:
        out[col] = pd.to_numeric(out[col], errors="coerce").astype(float)
    for col, spec in transform.get("categorical", {}).items():
        out[col] = out[col].where(out[col].notna(), spec["fill"])

    impute = transform["impute"]
    if numeric:
        X = out[numeric].to_numpy(dtype=float, copy=True)
        if impute["method"] == "median":
            fill = np.array([impute["fill"][c] for c in numeric], float)
            X = np.where(np.isnan(X), fill[None, :], X)
        elif impute["method"] == "iterative":
            X = impute_iterative(X, impute["iterative"])
        for j, col in enumerate(numeric):
            if col in transform.get("clip", {}):
                lo, hi = transform["clip"][col]
                X[:, j] = np.clip(X[:, j], lo, hi)
            if col in transform.get("scale", {}):
                s = transform["scale"][col]
                X[:, j] = (X[:, j] - s["center"]) / s["scale"]
        out[numeric] = X
    label = transform.get("label")
    if keep_label and label and label in frame.columns:
        out[label] = frame[label].to_numpy()
    return out
