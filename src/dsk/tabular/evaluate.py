"""Evaluate a table model on a new CSV: ROC-AUC, F1, accuracy, log loss and a calibration curve.

The CSV goes through the same checks as ``POST /v1/predict`` (missing/extra columns, wrong
types, NaN that nothing imputes -> a one-line ``DskError`` naming the column) plus the label
column, whose values must be classes the model knows. `dsk eval` calls :func:`evaluate_table`.

    >>> from dsk.tabular.evaluate import evaluate_table
    >>> m = evaluate_table(".dsk/artifacts/pretrain/<id>", "data/new.csv", plot=Path("calibration.png"))
    >>> m["roc_auc"], m["f1"], m["accuracy"], m["calibration"]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsk.errors import DskError


def read_csv(path: str | Path) -> pd.DataFrame:
    p = Path(path)
    if not p.is_file():
        raise DskError(f"{str(p)!r} does not exist; give a CSV with the model's columns and its label")
    try:
        return pd.read_parquet(p) if p.suffix.lower() == ".parquet" else pd.read_csv(p)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DskError(f"{p}: cannot parse as a table ({str(exc).splitlines()[0]}); fix the file") from None


def calibration(y_true: np.ndarray, proba: np.ndarray, n_bins: int = 10) -> dict[str, Any]:
    """Reliability curve: binary -> P(positive class); multi-class -> top-class confidence vs correct.

    Uniform bins on [0, 1]; empty bins are left out. ECE = sum over bins of (count/N) * |gap|.
    """
    if proba.shape[1] == 2:
        conf, hit, what = proba[:, 1], (y_true == 1).astype(float), "positive class probability"
    else:
        conf, hit, what = proba.max(axis=1), (proba.argmax(axis=1) == y_true).astype(float), "top-class confidence"
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, n_bins - 1)
    mean_pred, frac, count = [], [], []
    ece = 0.0
    for b in range(n_bins):
        sel = which == b
        if not sel.any():
            continue
        mean_pred.append(float(conf[sel].mean()))
        frac.append(float(hit[sel].mean()))
        count.append(int(sel.sum()))
        ece += sel.sum() / len(conf) * abs(conf[sel].mean() - hit[sel].mean())
    return {"of": what, "bins": n_bins, "mean_predicted": mean_pred, "fraction_true": frac, "count": count,
            "ece": float(ece)}


def table_metrics(y_true: np.ndarray, proba: np.ndarray) -> dict[str, Any]:
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, log_loss

    from dsk.tabular.train import roc_auc

    n_classes = proba.shape[1]
    pred = proba.argmax(axis=1)
    binary = n_classes == 2
    return {
        "n_rows": int(len(y_true)),
        "roc_auc": roc_auc(y_true, proba),
        "f1": float(f1_score(y_true, pred, average="binary" if binary else "macro", zero_division=0)),
        "f1_average": "binary (positive = second class)" if binary else "macro",
        "accuracy": float(accuracy_score(y_true, pred)),
        "log_loss": float(log_loss(y_true, np.clip(proba, 1e-7, 1.0), labels=list(range(n_classes)))),
        "confusion_matrix": confusion_matrix(y_true, pred, labels=list(range(n_classes))).tolist(),
        "calibration": calibration(y_true, proba),
    }


def plot_calibration(cal: dict[str, Any], out: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot([0, 1], [0, 1], ls=":", color="gray")
    ax.plot(cal["mean_predicted"], cal["fraction_true"], marker="o")
    ax.set_xlabel(f"mean {cal['of']}")
    ax.set_ylabel("observed frequency")
    ax.set_title(title or f"calibration (ECE {cal['ece']:.3f})")
    fig.tight_layout()
    fig.savefig(out, dpi=80, metadata={"Software": None})
    plt.close(fig)


def evaluate_table(model_dir: str | Path, data: str | Path | pd.DataFrame, *, plot: Path | None = None) -> dict[str, Any]:
    """Metrics of a table-model (or its ONNX export) artifact on a labelled CSV/parquet/DataFrame."""
    from dsk.tabular.predict import TablePredictor
    from dsk.tabular.preprocess import check_frame

    predictor = TablePredictor.load(model_dir)
    spec = predictor.spec
    where = "the table" if isinstance(data, pd.DataFrame) else str(data)
    frame = data if isinstance(data, pd.DataFrame) else read_csv(data)
    frame.columns = [str(c) for c in frame.columns]
    if spec.label not in frame.columns:
        raise DskError(f"{where}: label column {spec.label!r} is missing; evaluation needs the true labels")
    try:
        features = check_frame(frame, spec, label_ok=True)
    except ValueError as exc:
        raise DskError(f"{where}: {exc}") from None
    labels = frame[spec.label]
    if labels.isna().any():
        i = int(labels.isna().to_numpy().nonzero()[0][0])
        raise DskError(f"{where}: label column {spec.label!r} is empty in row {i}; every row needs a label")
    index = {str(c): i for i, c in enumerate(spec.classes)}
    unknown = [v for v in labels if str(v) not in index and not (isinstance(v, float) and str(int(v)) in index and v == int(v))]
    if unknown:
        raise DskError(f"{where}: label column {spec.label!r} has value {unknown[0]!r}, not a class of the model "
                       f"({', '.join(map(str, spec.classes))})")
    y = np.array([index[str(v)] if str(v) in index else index[str(int(v))] for v in labels], dtype=np.int64)
    proba = predictor.predict_frame(features)
    metrics = table_metrics(y, proba)
    metrics["classes"] = spec.classes
    if plot is not None:
        plot_calibration(metrics["calibration"], plot)
    return metrics
