"""Table track of `dsk featurize`: SHAP importance, crosses, UMAP, L1 selection, raw-vs-engineered.

Everything is fitted on a seeded, stratified training split; the validation rows only pass
through the saved transform (dsk.data.table_features), so val.parquet is produced exactly as
new rows will be at serving time.

    $ dsk featurize <clean-table-artifact> --umap-components 2 --cross-top-k 5
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from dsk import console
from dsk.data.table_features import (
    TableTransform,
    apply_transform,
    cross_values,
    encode_labels,
    one_hot_name,
    save_transform,
    umap_columns,
    umap_interpolate,
)
from dsk.errors import DskError
from dsk.runtime import StageContext

MAX_CLASSES = 50
SHAP_ROWS = 1000


# --------------------------------------------------------------------------- input checks


def read_table(ctx: StageContext) -> tuple[pd.DataFrame, str]:
    path = ctx.input.path / "data.parquet"
    if not path.is_file():
        raise DskError(f"{ctx.input.stage} {ctx.input.id} has no data.parquet; pass a clean table artifact")
    df = pd.read_parquet(path)
    label = ctx.params.label_column or ctx.input.metrics.get("label_column")
    if not label:
        raise DskError(f"{ctx.input.stage} {ctx.input.id} names no label column; pass --label-column NAME")
    if label not in df.columns:
        raise DskError(f"label column {label!r} is not in the table (columns: {', '.join(map(str, df.columns[:8]))}"
                       f"{', …' if len(df.columns) > 8 else ''}); pass --label-column NAME")
    return df, label


def column_specs(df: pd.DataFrame, label: str, max_categories: int) -> list[dict[str, Any]]:
    """How each feature column is encoded; a column that cannot be encoded is a DskError."""
    specs = []
    for name in df.columns:
        if name == label:
            continue
        s = df[name]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            specs.append({"name": str(name), "type": "numeric"})
        elif isinstance(s.dtype, pd.CategoricalDtype) or pd.api.types.is_string_dtype(s) or s.dtype == object:
            if s.dropna().map(type).isin([bytes, list, dict, tuple]).any():
                raise DskError(f"column {name!r} holds bytes/lists/dicts that cannot be encoded; drop it in clean")
            n = s.astype("string").nunique(dropna=False)
            if n > max_categories:
                raise DskError(f"column {name!r} is non-numeric with {n} distinct values (> max_categories="
                               f"{max_categories}); drop it in clean or raise --max-categories")
            specs.append({"name": str(name), "type": "categorical"})
        else:
            raise DskError(f"column {name!r} has type {s.dtype} that featurize cannot encode; "
                           "convert it to a number or text in clean, or drop it")
    if not specs:
        raise DskError("the table has no feature columns besides the label")
    return specs


def split_rows(y: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean val mask, stratified by class when every class has at least 2 rows."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    if val_fraction <= 0:
        return np.zeros(len(y), dtype=bool)
    stratify = y if np.bincount(y).min() >= 2 else None
    _, val_idx = train_test_split(idx, test_size=val_fraction, random_state=seed, stratify=stratify)
    mask = np.zeros(len(y), dtype=bool)
    mask[val_idx] = True
    return mask


# --------------------------------------------------------------------------- scores


def label_association(x: np.ndarray, y: np.ndarray, n_classes: int) -> float:
    """|Pearson correlation| with the label (max over one-vs-rest classes when multi-class)."""
    targets = [y == 1] if n_classes == 2 else [y == c for c in range(n_classes)]
    sx = x.std()
    if sx == 0 or not np.isfinite(sx):
        return 0.0
    best = 0.0
    for t in targets:
        t = t.astype(np.float64)
        if t.std() == 0:
            continue
        best = max(best, abs(float(np.corrcoef(x, t)[0, 1])))
    return best


def abs_corr_with(x: np.ndarray, M: np.ndarray) -> float:
    """The largest |correlation| of ``x`` with any column of ``M``."""
    xs = x - x.mean()
    nx = np.sqrt((xs ** 2).sum())
    if nx == 0:
        return 1.0  # a constant column copies no signal: treat as a near-copy so it is dropped
    Ms = M - M.mean(axis=0)
    nm = np.sqrt((Ms ** 2).sum(axis=0))
    ok = nm > 0
    if not ok.any():
        return 0.0
    return float(np.max(np.abs(xs @ Ms[:, ok]) / (nx * nm[ok])))


def gbm(n_estimators: int, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier

    return HistGradientBoostingClassifier(max_iter=n_estimators, random_state=seed, early_stopping=False)


def l1_logistic(n_classes: int, C: float, seed: int):
    import sklearn
    from sklearn.linear_model import LogisticRegression

    solver = "liblinear" if n_classes == 2 else "saga"
    major, minor = (int(p) for p in sklearn.__version__.split(".")[:2])
    if (major, minor) >= (1, 8):  # `penalty` is deprecated from 1.8 on
        return LogisticRegression(l1_ratio=1.0, C=C, solver=solver, max_iter=5000, random_state=seed)
    return LogisticRegression(penalty="l1", C=C, solver=solver, max_iter=5000, random_state=seed)


def cv_score(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int, n_estimators: int, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    scoring = "roc_auc" if n_classes == 2 else "accuracy"
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    return float(np.mean(cross_val_score(gbm(n_estimators, seed), X, y, cv=cv, scoring=scoring)))


def holdout_score(Xtr, ytr, Xva, yva, n_classes: int, n_estimators: int, seed: int) -> float | None:
    from sklearn.metrics import accuracy_score, roc_auc_score

    if len(yva) == 0 or len(np.unique(yva)) < 2:
        return None
    model = gbm(n_estimators, seed).fit(Xtr, ytr)
    if n_classes == 2:
        return float(roc_auc_score(yva, model.predict_proba(Xva)[:, 1]))
    return float(accuracy_score(yva, model.predict(Xva)))


# --------------------------------------------------------------------------- steps


def shap_importance(ctx: StageContext, X: pd.DataFrame, y: np.ndarray, n_classes: int) -> pd.Series:
    """Mean |SHAP| per feature of a gradient-boosted model (sklearn HistGradientBoosting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import shap

    p = ctx.params
    model = gbm(p.n_estimators, ctx.seed).fit(X.to_numpy(), y)
    rng = np.random.default_rng(ctx.seed)
    rows = np.sort(rng.choice(len(X), size=min(SHAP_ROWS, len(X)), replace=False))
    sample = X.iloc[rows]
    values = np.asarray(shap.TreeExplainer(model).shap_values(sample.to_numpy()))
    # binary: (n, f); multi-class: (n, f, K) in shap >= 0.45 (a list of K (n, f) before)
    if values.ndim == 3 and values.shape[0] == n_classes and values.shape[1] == len(sample):
        values = np.moveaxis(values, 0, -1)
    per_feature = np.abs(values).mean(axis=(0, 2) if values.ndim == 3 else 0)
    importance = pd.Series(per_feature, index=X.columns).sort_values(ascending=False, kind="stable")

    fig = plt.figure()
    # the beeswarm jitters points at random: a seeded generator keeps the PNG reproducible
    import inspect

    seeded = {"rng": np.random.default_rng(ctx.seed)} if "rng" in inspect.signature(shap.summary_plot).parameters else {}
    rng_state = np.random.get_state()
    if not seeded:  # shap < 0.47 draws from numpy's global RNG
        np.random.seed(ctx.seed)
    if values.ndim == 2:
        shap.summary_plot(values, sample, show=False, max_display=20, **seeded)
    else:
        shap.summary_plot([values[:, :, k] for k in range(values.shape[2])], sample, show=False,
                          max_display=20, plot_type="bar", **seeded)
    plt.gcf().set_size_inches(8, 6)
    plt.tight_layout()
    plt.savefig(ctx.out / "shap_summary.png", dpi=80, metadata={"Software": None})
    plt.close("all")
    np.random.set_state(rng_state)
    del fig
    return importance


def find_crosses(ctx: StageContext, X: pd.DataFrame, y: np.ndarray, n_classes: int,
                 importance: pd.Series, inputs: list[dict[str, Any]]) -> tuple[list[dict], dict[str, int]]:
    """Greedy: candidates in order of label association; keep gains that are not near-copies."""
    p = ctx.params
    numeric = {c["name"] for c in inputs if c["type"] == "numeric"}
    source_of = {one_hot_name(c["name"], v): c["name"] for c in inputs if c["type"] == "categorical"
                 for v in c["categories"]}
    top_num = [c for c in importance.index if c in numeric][: p.cross_top_k]
    top_cat = [c for c in importance.index if c in source_of][: p.cross_top_k]
    candidates: list[tuple[str, str, str, str]] = []
    for i, a in enumerate(top_num):
        for b in top_num[i + 1:]:
            candidates += [(f"{a}*{b}", "product", a, b), (f"{a}/{b}", "ratio", a, b), (f"{b}/{a}", "ratio", b, a)]
    for i, a in enumerate(top_cat):
        for b in top_cat[i + 1:]:
            if source_of[a] != source_of[b]:  # two values of one column never co-occur
                candidates.append((f"{a}&{b}", "and", a, b))

    assoc = {c: label_association(X[c].to_numpy(), y, n_classes) for c in X.columns}
    scored = []
    for name, op, a, b in candidates:
        values = cross_values(op, X[a].to_numpy(), X[b].to_numpy())
        scored.append((label_association(values, y, n_classes), name, op, a, b, values))
    scored.sort(key=lambda s: (-s[0], s[1]))

    kept: list[dict] = []
    counts = {"candidates": len(scored), "n_kept": 0, "no_gain": 0, "near_copy": 0}
    existing = X.to_numpy(dtype=np.float64)
    for score, name, op, a, b, values in scored:
        parents = max(assoc[a], assoc[b])
        if score < parents + p.cross_min_gain:
            counts["no_gain"] += 1
            continue
        copy = abs_corr_with(values, existing)
        if copy >= p.cross_max_corr:
            counts["near_copy"] += 1
            continue
        kept.append({"name": name, "op": op, "a": a, "b": b, "label_corr": round(score, 4),
                     "parents_label_corr": round(parents, 4), "max_corr_existing": round(copy, 4)})
        existing = np.column_stack([existing, values])
        counts["n_kept"] += 1
    return kept, counts


def fit_umap(ctx: StageContext, Z: np.ndarray, n_components: int):
    import umap

    p = ctx.params
    reducer = umap.UMAP(n_components=n_components, n_neighbors=min(p.umap_neighbors, len(Z) - 1),
                        n_epochs=p.umap_epochs, random_state=ctx.seed, init="spectral", n_jobs=1)
    return np.asarray(reducer.fit_transform(Z), dtype=np.float64)


def scatter_plot(ctx: StageContext, emb2: np.ndarray, y: np.ndarray, classes: list[Any], label: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    for k, cls in enumerate(classes):
        m = y == k
        ax.scatter(emb2[m, 0], emb2[m, 1], s=8, alpha=0.7, label=str(cls))
    ax.set_xlabel("umap_0")
    ax.set_ylabel("umap_1")
    ax.set_title("UMAP of the training split, coloured by label")
    ax.legend(title=label, markerscale=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(ctx.out / "umap_scatter.png", dpi=80, metadata={"Software": None})
    plt.close(fig)


def select_features(ctx: StageContext, X: pd.DataFrame, y: np.ndarray, n_classes: int) -> dict[str, dict]:
    """L1 logistic RFECV; a feature survives if RFECV keeps it and its L1 weight is non-zero."""
    from sklearn.feature_selection import RFECV
    from sklearn.model_selection import StratifiedKFold

    p = ctx.params
    Z = X.to_numpy(dtype=np.float64)
    scale = Z.std(axis=0)
    Z = (Z - Z.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
    if not p.select:
        return {c: {"kept": True, "why": "selection off (--no-select)"} for c in X.columns}
    rfecv = RFECV(l1_logistic(n_classes, p.l1_c, ctx.seed), step=1, min_features_to_select=1,
                  cv=StratifiedKFold(n_splits=p.cv_folds, shuffle=True, random_state=ctx.seed),
                  scoring="roc_auc" if n_classes == 2 else "accuracy")
    rfecv.fit(Z, y)
    coef = np.abs(np.atleast_2d(rfecv.estimator_.coef_)).max(axis=0)
    weights = dict(zip(X.columns[rfecv.support_], coef))
    out: dict[str, dict] = {}
    for col, rank in zip(X.columns, rfecv.ranking_):
        if rank > 1:
            out[col] = {"kept": False, "why": f"eliminated by RFECV (rank {int(rank)})"}
        elif weights[col] == 0:
            out[col] = {"kept": False, "why": "L1 weight is zero"}
        else:
            out[col] = {"kept": True, "why": f"RFECV kept it; |L1 weight| {weights[col]:.3g} on standardized data"}
    if not any(v["kept"] for v in out.values()):  # never return an empty feature set
        best = max(weights, key=weights.get)
        out[best] = {"kept": True, "why": "strongest RFECV feature (every L1 weight was zero)"}
    return out


# --------------------------------------------------------------------------- build


def build_table(ctx: StageContext) -> None:
    p = ctx.params
    started = time.perf_counter()
    df, label = read_table(ctx)
    inputs = column_specs(df, label, p.max_categories)

    missing_label = df[label].isna().to_numpy()
    classes = sorted(df.loc[~missing_label, label].unique().tolist(), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise DskError(f"label column {label!r} has {len(classes)} class{'es' if len(classes) != 1 else ''} "
                       f"({', '.join(map(str, classes)) or 'all missing'}); a classifier needs at least two")
    if len(classes) > MAX_CLASSES:
        raise DskError(f"label column {label!r} has {len(classes)} distinct values; featurize supports "
                       f"classification labels (at most {MAX_CLASSES} classes)")
    rejects = pd.DataFrame({"row": np.flatnonzero(missing_label).astype(np.int64),
                            "reason": "missing label"})
    rejects.to_parquet(ctx.out / "rejects.parquet", index=False)
    if missing_label.any():
        ctx.log.warning(f"{int(missing_label.sum())} rows without a label skipped (see rejects.parquet)")
    df = df.loc[~missing_label]
    df.index = pd.RangeIndex(len(missing_label))[~missing_label]
    df.index.name = "row"

    spec: dict[str, Any] = {"version": 1, "label_column": label, "classes": classes, "inputs": inputs}
    transform = TableTransform(spec, {})
    y_all = encode_labels(transform, df[label])
    n_classes = len(classes)
    if np.bincount(y_all).min() < p.cv_folds:
        raise DskError(f"label {label!r}: a class has fewer than cv_folds={p.cv_folds} rows; lower --cv-folds")
    is_val = split_rows(y_all, p.val_fraction, ctx.seed)
    train, val = df.iloc[~is_val], df.iloc[is_val]
    ytr, yva = y_all[~is_val], y_all[is_val]
    ctx.log.info(f"{len(df)} rows, {len(inputs)} feature columns, {n_classes} classes: "
                 f"{len(train)} train, {len(val)} val")

    # fit the encoding on the training split only
    for col in inputs:
        if col["type"] == "numeric":
            med = pd.to_numeric(train[col["name"]], errors="coerce").median()
            col["fill"] = float(med) if pd.notna(med) else 0.0
        else:
            col["categories"] = sorted(train[col["name"]].astype("string").fillna("<missing>").unique().tolist())
    X_raw = apply_transform(transform, train, upto="encode")

    from threadpoolctl import threadpool_limits

    steps = ["SHAP importance", "crosses", "UMAP", "selection", "scores"]
    # small tables: one OpenMP thread is 10x faster than two spinning ones on a busy 2-core box
    # (HistGradientBoosting, 548 rows: 0.6 s vs 7 s); results do not depend on the thread count
    threads = 1 if len(train) < 20_000 else None
    with threadpool_limits(limits=threads), console.progress_task("featurize (table)", len(steps)) as advance:
        tick = time.perf_counter()

        def done(step: str) -> None:
            nonlocal tick
            ctx.log.info(f"{step}: {time.perf_counter() - tick:.1f}s")
            tick = time.perf_counter()
            advance(1, status=step)

        importance = shap_importance(ctx, X_raw, ytr, n_classes)
        done("SHAP")
        spec["crosses"], cross_counts = find_crosses(ctx, X_raw, ytr, n_classes, importance, inputs)
        X_cross = apply_transform(transform, train, upto="cross")
        done("crosses")

        spec["umap"] = None
        if p.umap_components > 0:
            mean = X_cross.to_numpy().mean(axis=0)
            scale = X_cross.to_numpy().std(axis=0)
            scale = np.where(scale > 0, scale, 1.0)
            Z = (X_cross.to_numpy() - mean) / scale
            emb = fit_umap(ctx, Z, p.umap_components)
            k = min(p.umap_neighbors, len(Z))
            spec["umap"] = {"components": p.umap_components, "mode": p.umap_mode, "k": k,
                            "input_columns": list(X_cross.columns),
                            "method": "nearest-neighbour interpolation of the saved training embedding"}
            transform.arrays.update({"umap_mean": mean, "umap_scale": scale, "umap_train_x": Z,
                                     "umap_train_embedding": emb})
            emb2 = emb if p.umap_components >= 2 else fit_umap(ctx, Z, 2)
            scatter_plot(ctx, emb2, ytr, classes, label)
            ctx.log.info(f"UMAP: {p.umap_components} components ({p.umap_mode}), k={k} for new rows; "
                         f"max |interpolated - fitted| on train = "
                         f"{np.abs(umap_interpolate(Z, emb, Z, k) - emb).max():.2g}")
        X_cand = apply_transform(transform, train, upto="umap")
        done("UMAP")

        decisions = select_features(ctx, X_cand, ytr, n_classes)
        spec["selected"] = [c for c in X_cand.columns if decisions[c]["kept"]]
        spec["selection"] = {"method": "RFECV over L1-regularised logistic regression" if p.select else "none",
                             "decisions": decisions}
        done("selection")

        X_eng = apply_transform(transform, train)
        X_val = apply_transform(transform, val)
        raw_val = apply_transform(transform, val, upto="encode")
        metric = "roc_auc" if n_classes == 2 else "accuracy"
        scores = {
            "metric": metric,
            "cv_raw": cv_score(X_raw.to_numpy(), ytr, n_classes, p.cv_folds, p.n_estimators, ctx.seed),
            "cv_engineered": cv_score(X_eng.to_numpy(), ytr, n_classes, p.cv_folds, p.n_estimators, ctx.seed),
            "holdout_raw": holdout_score(X_raw.to_numpy(), ytr, raw_val.to_numpy(), yva, n_classes, p.n_estimators, ctx.seed),
            "holdout_engineered": holdout_score(X_eng.to_numpy(), ytr, X_val.to_numpy(), yva, n_classes, p.n_estimators, ctx.seed),
        }
        scores = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in scores.items()}
        done("scores")

    save_transform(transform, ctx.out)
    label_of = lambda idx: [classes[i] for i in idx]  # noqa: E731
    X_eng.assign(**{label: label_of(ytr)}).to_parquet(ctx.out / "train.parquet")
    X_val.assign(**{label: label_of(yva)}).to_parquet(ctx.out / "val.parquet")

    chosen = {c: decisions[c]["why"] for c in spec["selected"]}
    report = {
        "rows": {"train": len(train), "val": len(val), "rejected": int(missing_label.sum())},
        "label_column": label,
        "classes": classes,
        "importance": [{"feature": f, "mean_abs_shap": round(float(v), 6)} for f, v in importance.items()],
        "crosses": {"kept": spec["crosses"], **cross_counts},
        "umap": spec["umap"] and {k: v for k, v in spec["umap"].items() if k != "input_columns"},
        "features": {"raw": list(X_raw.columns), "candidates": list(X_cand.columns), "selected": spec["selected"],
                     "decisions": decisions},
        "scores": scores,
        "notes": ("cv_* are on the training split, which also chose the crosses and the selection, so "
                  "cv_engineered is optimistic; holdout_* score the untouched validation split."),
    }
    (ctx.out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True, default=str) + "\n")

    ctx.metrics.update({
        "label_column": label,
        "n_classes": n_classes,
        "n_train_rows": len(train),
        "n_val_rows": len(val),
        "n_features_raw": X_raw.shape[1],
        "n_features_selected": len(spec["selected"]),
        "n_crosses_kept": cross_counts["n_kept"],
        "metric": metric,
        "cv_raw": scores["cv_raw"],
        "cv_engineered": scores["cv_engineered"],
        "holdout_raw": scores["holdout_raw"],
        "holdout_engineered": scores["holdout_engineered"],
        "selected_features": chosen,
    })
    ctx.key_metric = "cv_engineered"
    ctx.log.info(f"table features built in {time.perf_counter() - started:.1f}s")
    print_summary(report, importance)


def print_summary(report: dict[str, Any], importance: pd.Series) -> None:
    if console.is_quiet():
        return
    from rich.table import Table

    s = report["scores"]
    t = Table(title="featurize (table)", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("rows", f"{report['rows']['train']} train, {report['rows']['val']} val, "
              f"{report['rows']['rejected']} rejected")
    t.add_row("top SHAP", ", ".join(f"{f} {v:.3g}" for f, v in list(importance.items())[:5]))
    c = report["crosses"]
    t.add_row("crosses", f"{c['n_kept']} kept of {c['candidates']} "
              f"({c['no_gain']} no gain, {c['near_copy']} near-copies)")
    f = report["features"]
    t.add_row("features", f"{len(f['raw'])} raw → {len(f['candidates'])} candidates → {len(f['selected'])} selected")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    t.add_row(f"CV {s['metric']}", f"raw {fmt(s['cv_raw'])} → engineered {fmt(s['cv_engineered'])}")
    t.add_row(f"holdout {s['metric']}", f"raw {fmt(s['holdout_raw'])} → engineered {fmt(s['holdout_engineered'])}")
    console.console.print(t)
