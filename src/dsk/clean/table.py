"""Table cleaning: duplicate rows, 3σ/MAD outliers, imputation, label issues, robust scaling.

Every input row ends up either in `data.parquet` or in `rejects.parquet` with its reason; the
fitted imputation and scaling go to `transform.json`, which `dsk.data.table_transform`
replays on new rows.

    $ dsk clean data/sample/breast_cancer.csv --label diagnosis --impute iterative
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from dsk.clean.params import Params
from dsk.data.table_transform import TRANSFORM_VERSION, apply_transform
from dsk.errors import DskError

TABLE_SUFFIXES = {".csv", ".tsv", ".parquet"}
MAD_TO_SIGMA = 1.4826  # MAD of a normal distribution times this is its standard deviation


# --------------------------------------------------------------------------- reading


def _check_ragged(f: Path, sep: str) -> None:
    """pandas silently pads short rows with NaN; a row with a different field count is an error."""
    with open(f, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter=sep)
        header = next(reader, None)
        if header is None:
            raise DskError(f"{f}: empty CSV; give a file with a header row and data")
        for row in reader:
            if row and len(row) != len(header):
                raise DskError(
                    f"{f}: ragged CSV: line {reader.line_num} has {len(row)} fields, the header has "
                    f"{len(header)}; fix that row or quote fields that contain '{sep}'")


def read_table(path: Path) -> pd.DataFrame:
    files = [path] if path.is_file() else sorted(
        f for f in path.rglob("*") if f.suffix.lower() in TABLE_SUFFIXES and not f.name.startswith("."))
    frames = []
    for f in files:
        if f.stat().st_size == 0:
            raise DskError(f"{f}: empty file; give a table with a header row and data")
        try:
            if f.suffix.lower() == ".parquet":
                frames.append(pd.read_parquet(f))
            else:
                sep = "\t" if f.suffix.lower() == ".tsv" else ","
                _check_ragged(f, sep)
                frames.append(pd.read_csv(f, sep=sep))
        except UnicodeDecodeError:
            raise DskError(f"{f}: not UTF-8 text (binary file?); give a UTF-8 CSV or a parquet file") from None
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
            raise DskError(f"{f}: cannot parse ({str(exc).splitlines()[0]}); fix the file") from None
        except (OSError, pa.ArrowException) as exc:
            raise DskError(f"{f}: unreadable table ({exc.__class__.__name__}); give a CSV or parquet file") from None
    if not frames:
        raise DskError(f"no .csv/.tsv/.parquet table in {str(path)!r}")
    cols = list(frames[0].columns)
    for f, fr in zip(files[1:], frames[1:]):
        if list(fr.columns) != cols:
            raise DskError(f"{f}: columns differ from {files[0].name}; put tables with one schema in a directory")
    df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    if len(df) == 0:
        raise DskError(f"{str(path)!r} has a header but no rows")
    return df


# --------------------------------------------------------------------------- steps


def column_stats(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    stats = {}
    for col in df.columns:
        s = df[col]
        entry: dict[str, Any] = {"count": int(s.notna().sum()), "missing": int(s.isna().sum())}
        if pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s):
            v = s.astype(float)
            entry.update({k: _num(x) for k, x in (("mean", v.mean()), ("std", v.std()), ("min", v.min()),
                                                   ("median", v.median()), ("max", v.max()))})
        else:
            entry["unique"] = int(s.nunique())
        stats[str(col)] = entry
    return stats


def _num(x: Any) -> float | None:
    x = float(x)
    return None if np.isnan(x) else x


def outlier_bounds(values: pd.Series, method: str, t: float) -> tuple[float, float] | None:
    v = values.dropna().astype(float)
    if len(v) < 3:
        return None
    if method == "mad":
        center = float(v.median())
        spread = MAD_TO_SIGMA * float((v - center).abs().median())
    else:
        center, spread = float(v.mean()), float(v.std())
    if not spread > 0:
        return None
    return center - t * spread, center + t * spread


def fit_iterative(X: np.ndarray, m: int, seed: int) -> tuple[np.ndarray, dict[str, Any], np.ndarray]:
    """m IterativeImputers with posterior sampling; returns the pooled fill, its replay spec and
    the between-imputation variance of each column's imputed cells (Rubin's B)."""
    from sklearn.experimental import enable_iterative_imputer  # noqa: F401
    from sklearn.impute import IterativeImputer

    draws, imputations = [], []
    lo, hi = np.nanmin(X, axis=0), np.nanmax(X, axis=0)
    for i in range(m):
        imp = IterativeImputer(sample_posterior=True, random_state=seed + i, max_iter=10,
                               min_value=lo, max_value=hi, keep_empty_features=True)
        draws.append(imp.fit_transform(X))
        imputations.append({
            "initial": [float(v) for v in imp.initial_imputer_.statistics_],
            "steps": [{"target": int(s.feat_idx), "inputs": [int(j) for j in s.neighbor_feat_idx],
                       "coef": [float(c) for c in s.estimator.coef_], "intercept": float(s.estimator.intercept_)}
                      for s in imp.imputation_sequence_],
        })
    stack = np.stack(draws)
    missing = np.isnan(X)
    between = np.where(missing.any(axis=0), (stack.var(axis=0, ddof=1) if m > 1 else np.zeros_like(X))
                       .sum(axis=0) / np.maximum(missing.sum(axis=0), 1), 0.0)
    spec = {"min": [float(v) for v in lo], "max": [float(v) for v in hi], "imputations": imputations}
    return stack.mean(axis=0), spec, between


def label_issue_mask(X: np.ndarray, y: np.ndarray, folds: int, seed: int) -> tuple[np.ndarray, dict[str, Any]]:
    """Confident learning (Northcutt et al. 2021): out-of-fold probabilities from k-fold CV,
    per-class thresholds t_j = mean p_j over rows labelled j; a row is an issue when, among the
    classes whose probability reaches their threshold, the most probable is not its label."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, y_idx = np.unique(y, return_inverse=True)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    probs = cross_val_predict(model, X, y_idx, cv=cv, method="predict_proba")
    thresholds = np.array([probs[y_idx == j, j].mean() for j in range(len(classes))])
    above = probs >= thresholds[None, :]
    confident = np.where(above, probs, -1.0)
    best = confident.argmax(axis=1)
    flagged = above.any(axis=1) & (best != y_idx)
    info = {"classes": [str(c) for c in classes], "thresholds": [float(t) for t in thresholds],
            "oof_accuracy": float((probs.argmax(axis=1) == y_idx).mean())}
    return flagged, info


def _is_classification(y: pd.Series) -> bool:
    if not pd.api.types.is_numeric_dtype(y) or pd.api.types.is_bool_dtype(y):
        return True
    v = y.dropna()
    return bool((v == v.round()).all() and v.nunique() <= 50)


# --------------------------------------------------------------------------- the stage


def clean_table(ctx: Any, path: Path) -> dict[str, Any]:
    p: Params = ctx.params
    df = read_table(path)
    df.columns = [str(c) for c in df.columns]
    label = p.label
    if label is not None and label not in df.columns:
        raise DskError(f"label column {label!r} not in the table; columns: {', '.join(df.columns[:20])}")
    n_in = len(df)
    before = column_stats(df)
    features = [c for c in df.columns if c != label]
    numeric = [c for c in features if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    categorical = [c for c in features if c not in numeric]
    reason = pd.Series([None] * n_in, index=df.index, dtype=object)
    detail = pd.Series([""] * n_in, index=df.index, dtype=object)

    # 1. exact duplicate rows: the first copy is kept
    if p.drop_duplicates:
        dup = df.duplicated(keep="first")
        first_of = df.groupby(list(df.columns), dropna=False, sort=False).ngroup()
        first_row = pd.Series(df.index, index=df.index).groupby(first_of).transform("min")
        reason[dup] = "duplicate_row"
        detail[dup] = [f"same as row {int(r)}" for r in first_row[dup]]
    if label is not None:
        miss = reason.isna() & df[label].isna()
        reason[miss] = "missing_label"
    live = reason.isna()

    # 2. outliers per numeric column, fitted on the rows still in play
    clip_bounds: dict[str, list[float]] = {}
    outlier_cols: dict[str, int] = {}
    work = df.copy()
    if p.outliers != "none":
        hit = pd.DataFrame(False, index=df.index, columns=numeric)
        for col in numeric:
            bounds = outlier_bounds(df.loc[live, col], p.outliers, p.outlier_threshold)
            if bounds is None:
                continue
            lo, hi = bounds
            v = df[col]
            hit[col] = live & ((v < lo) | (v > hi))
            outlier_cols[col] = int(hit[col].sum())
            if p.outlier_action == "clip":
                clip_bounds[col] = [lo, hi]
                work[col] = v.clip(lo, hi)
        if p.outlier_action == "drop" and numeric:
            rows = hit.any(axis=1)
            reason[rows] = "outlier"
            detail[rows] = [",".join(c for c in numeric if hit.at[i, c]) for i in df.index[rows]]
    live = reason.isna()

    # 3. missing values, fitted on the rows still in play
    kept = work.loc[live].copy()
    impute_spec: dict[str, Any] = {"method": p.impute}
    imputation_variance: dict[str, float] = {}
    cat_spec = {}
    for col in categorical:
        mode = kept[col].mode(dropna=True)
        fill = mode.iloc[0] if len(mode) else ""
        fill = fill.item() if hasattr(fill, "item") else fill
        cat_spec[col] = {"fill": fill}
        kept[col] = kept[col].where(kept[col].notna(), fill)
    n_missing = int(kept[numeric].isna().sum().sum()) if numeric else 0
    if numeric and len(kept):
        X = np.array(kept[numeric].to_numpy(dtype=float), copy=True)  # writable: pandas may hand out a read-only view
        if p.impute == "median":
            med = np.nanmedian(np.where(np.isnan(X).all(axis=0)[None, :], 0.0, X), axis=0)
            impute_spec["fill"] = {c: float(v) for c, v in zip(numeric, med)}
            X = np.where(np.isnan(X), med[None, :], X)
        elif p.impute == "iterative" and np.isnan(X).any():
            X, spec, between = fit_iterative(X, p.n_imputations, ctx.seed)
            impute_spec["iterative"] = spec
            imputation_variance = {c: float(b) for c, b in zip(numeric, between) if b > 0}
        elif p.impute == "iterative":
            impute_spec = {"method": "none"}
        kept[numeric] = X
    if p.impute == "none" and n_missing:
        ctx.log.warning(f"{n_missing} missing numeric value(s) left in place (impute=none)")

    # 4. label issues from out-of-fold probabilities
    label_info: dict[str, Any] = {}
    kept_flags = pd.Series(False, index=kept.index)
    if label is not None and p.label_issues != "off":
        y = kept[label]
        counts = y.value_counts()
        if not _is_classification(y):
            label_info["skipped"] = "label looks continuous (regression); label issues need classes"
        elif len(counts) < 2 or counts.min() < p.label_folds or not numeric:
            label_info["skipped"] = f"need >= 2 classes with >= {p.label_folds} rows each and numeric features"
        elif kept[numeric].isna().any().any():
            label_info["skipped"] = "missing values left (impute=none)"
        else:
            flagged, label_info = label_issue_mask(kept[numeric].to_numpy(float), y.to_numpy(), p.label_folds, ctx.seed)
            kept_flags = pd.Series(flagged, index=kept.index)
            label_info["flagged"] = int(flagged.sum())
        if "skipped" in label_info:
            ctx.log.warning(f"label issues skipped: {label_info['skipped']}")
    if p.label_issues == "reject" and kept_flags.any():
        ids = kept_flags.index[kept_flags]
        reason[ids] = "label_issue"
        detail[ids] = [f"label {df.at[i, label]!r}" for i in ids]
        kept = kept.loc[~kept_flags]
        kept_flags = kept_flags.loc[~kept_flags]

    # 5. robust scaling of numeric features, fitted on the kept rows
    scale_spec = {}
    if p.scale:
        for col in numeric:
            v = kept[col].astype(float)
            med = float(v.median()) if len(v) else 0.0
            iqr = float(v.quantile(0.75) - v.quantile(0.25)) if len(v) else 0.0
            scale_spec[col] = {"center": med if np.isfinite(med) else 0.0, "scale": iqr if iqr > 0 else 1.0}
    transform = {
        "version": TRANSFORM_VERSION, "label": label, "features": features, "numeric": numeric,
        "categorical": cat_spec, "impute": impute_spec, "clip": clip_bounds, "scale": scale_spec,
    }
    # the kept rows are already imputed: replay only clipping and scaling on them
    out = apply_transform(kept, {**transform, "impute": {"method": "none"}})
    if p.label_issues == "mark" and label is not None:
        out["_label_issue"] = kept_flags.to_numpy()
    out = out.reset_index(drop=True)
    pq.write_table(pa.Table.from_pandas(out, preserve_index=False), ctx.out / "data.parquet")

    rej = df.loc[reason.notna()].copy()
    rej.insert(0, "_row", rej.index.astype("int64"))
    rej["_reason"] = reason[reason.notna()].astype(str)
    rej["_detail"] = detail[reason.notna()].astype(str)
    pq.write_table(pa.Table.from_pandas(rej.reset_index(drop=True), preserve_index=False), ctx.out / "rejects.parquet")
    (ctx.out / "transform.json").write_text(json.dumps(transform, indent=1, sort_keys=True))

    by_reason = reason.dropna().value_counts()
    report = {
        "kind": "table",
        "input_rows": n_in,
        "kept_rows": int(len(out)),
        "rejected_rows": int(reason.notna().sum()),
        "rejects_by_reason": {str(k): int(v) for k, v in sorted(by_reason.items())},
        "label_column": label,
        "numeric_columns": numeric,
        "categorical_columns": categorical,
        "outliers_per_column": {k: v for k, v in outlier_cols.items() if v},
        "outlier_action": p.outlier_action if p.outliers != "none" else None,
        "missing_values_imputed": n_missing if p.impute != "none" else 0,
        "imputation_between_variance": imputation_variance,
        "label_issues": label_info,
        "columns_before": before,
        "columns_after": column_stats(out),
    }
    assert report["kept_rows"] + report["rejected_rows"] == n_in
    return report
