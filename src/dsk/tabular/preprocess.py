"""Raw table rows -> the classifier's inputs: checks, cleaning replay, encoding (numpy and torch).

A `table-model` artifact carries what a raw row needs before the network sees it: the clean
stage's ``transform.json`` (imputation, clipping, robust scaling) and, when the model was
trained on a featurize artifact, the fitted feature transform. This module

* checks rows against the training schema (:func:`rows_to_frame`, :func:`check_frame`): a
  missing or extra column, a wrong type, NaN where nothing imputes it, or an infinite value is
  a ``ValueError`` naming the column (the server turns it into a 400, `dsk eval` into exit 2);
* replays the transforms with the reference numpy code (:func:`model_inputs`);
* implements the same cleaning as torch ops (:class:`CleanTransform`) so that the exported
  ONNX graph takes raw rows. It runs in float64 like the numpy replay, so both agree to ~1e-12.

    >>> spec = TableSpec.load(".dsk/artifacts/pretrain/<id>")
    >>> frame = rows_to_frame([{"mean_radius": 14.2, ...}], spec)
    >>> x_num, x_cat = model_inputs(frame, spec)
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from dsk.errors import DskError

CONFIG = "config.json"
CLEAN_TRANSFORM = "transform.json"
FEATURE_TRANSFORM_DIR = "feature_transform"


@dataclass
class TableSpec:
    """What a table model expects: raw columns, the cleaning replay, and its own input columns."""

    label: str | None
    classes: list[Any]
    transform: dict[str, Any]  # the clean stage's transform.json
    inputs_numeric: list[str]  # the network's numeric inputs, in order (after featurize, if any)
    inputs_categorical: dict[str, list[str]]  # column -> vocabulary (code = index + 1, 0 = unseen)
    feature_transform: Any = None  # dsk.data.table_features' fitted transform, or None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_features(self) -> list[str]:
        return list(self.transform["features"])

    @property
    def raw_numeric(self) -> list[str]:
        return list(self.transform["numeric"])

    @property
    def raw_categorical(self) -> list[str]:
        return list(self.transform.get("categorical", {}))

    @property
    def imputes_numeric(self) -> bool:
        return self.transform["impute"]["method"] in ("median", "iterative")

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "classes": self.classes, "inputs_numeric": self.inputs_numeric,
                "inputs_categorical": self.inputs_categorical}

    @classmethod
    def load(cls, model_dir: str | Path) -> "TableSpec":
        root = Path(model_dir)
        cfg_path, tr_path = root / CONFIG, root / CLEAN_TRANSFORM
        if not cfg_path.is_file() or not tr_path.is_file():
            raise DskError(f"{str(root)!r} is not a table-model artifact (needs config.json and transform.json)")
        meta = json.loads(cfg_path.read_text())
        from dsk.data.table_transform import load_transform

        feature_transform = None
        if (root / FEATURE_TRANSFORM_DIR).is_dir():
            from dsk.tabular.features import load_feature_transform

            feature_transform = load_feature_transform(root / FEATURE_TRANSFORM_DIR)
        return cls(label=meta.get("label"), classes=list(meta["classes"]), transform=load_transform(tr_path),
                   inputs_numeric=list(meta["inputs_numeric"]),
                   inputs_categorical={k: list(v) for k, v in meta.get("inputs_categorical", {}).items()},
                   feature_transform=feature_transform, meta=meta)


# --------------------------------------------------------------------------- checks


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def rows_to_frame(rows: list[dict[str, Any]], spec: TableSpec) -> pd.DataFrame:
    """JSON rows (a list of {column: value}) -> a raw DataFrame, strictly checked.

    Numeric columns take JSON numbers or null (null/NaN only where the clean transform imputes);
    categorical columns take strings (numbers and booleans are read as their text) or null.
    """
    if not isinstance(rows, list) or not rows:
        raise ValueError("no rows: send a non-empty list of {column: value} objects")
    expected = spec.raw_features
    expected_set = set(expected)
    numeric, categorical = set(spec.raw_numeric), set(spec.raw_categorical)
    columns: dict[str, list[Any]] = {c: [] for c in expected}
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"row {i}: expected an object of column: value, got {type(row).__name__}")
        missing = [c for c in expected if c not in row]
        if missing:
            raise ValueError(f"row {i}: missing column {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [c for c in row if c not in expected_set]
        if extra:
            what = " (the label; send features only)" if extra[0] == spec.label else ""
            raise ValueError(f"row {i}: unexpected column {extra[0]!r}{what}")
        for c in expected:
            v = row[c]
            if c in numeric:
                if v is None:
                    v = math.nan
                elif not _is_number(v):
                    raise ValueError(f"row {i}: column {c!r} expects a number, got {type(v).__name__} {v!r}")
                v = float(v)
            elif c in categorical and v is not None and not isinstance(v, str):
                if isinstance(v, (dict, list)):
                    raise ValueError(f"row {i}: column {c!r} expects a string, got {type(v).__name__}")
                v = str(v)
            columns[c].append(v)
    frame = pd.DataFrame({c: pd.Series(columns[c], dtype=float if c in numeric else object) for c in expected})
    return check_frame(frame, spec)


def check_frame(frame: pd.DataFrame, spec: TableSpec, *, label_ok: bool = False) -> pd.DataFrame:
    """Check a raw DataFrame (e.g. a CSV) against the schema; returns its feature columns, typed.

    With ``label_ok`` the label column may be present (evaluation); any other unknown column,
    a missing column, a non-numeric value in a numeric column, an infinite value, or a missing
    value that nothing imputes is a ValueError naming the column (and the first bad row).
    """
    expected = spec.raw_features
    missing = [c for c in expected if c not in frame.columns]
    if missing:
        raise ValueError(f"missing column {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    allowed = set(expected) | ({spec.label} if label_ok and spec.label else set())
    extra = [str(c) for c in frame.columns if c not in allowed]
    if extra:
        what = " (the label; send features only)" if extra[0] == spec.label else ""
        raise ValueError(f"unexpected column {extra[0]!r}{what}")
    out = pd.DataFrame(index=frame.index)
    for c in expected:
        s = frame[c]
        if c in spec.raw_numeric:
            if pd.api.types.is_bool_dtype(s):
                raise ValueError(f"column {c!r} expects numbers, got booleans")
            num = pd.to_numeric(s, errors="coerce").astype(float)
            bad = num.isna() & s.notna()
            if bad.any():
                i = bad.to_numpy().nonzero()[0][0]
                raise ValueError(f"column {c!r} expects numbers, got {s.iloc[i]!r} in row {i}")
            if np.isinf(num.to_numpy()).any():
                i = np.isinf(num.to_numpy()).nonzero()[0][0]
                raise ValueError(f"column {c!r}: infinite value in row {i}")
            if not spec.imputes_numeric and num.isna().any():
                i = num.isna().to_numpy().nonzero()[0][0]
                raise ValueError(f"column {c!r}: missing value (null/NaN) in row {i}, and this model was "
                                 f"cleaned with impute=none; send a number")
            out[c] = num
        else:
            out[c] = s.astype(object).where(s.notna(), None).map(lambda v: v if v is None or isinstance(v, str) else str(v))
    return out


# --------------------------------------------------------------------------- numpy path (reference)


def encode_categorical(values: pd.Series, vocab: list[str]) -> np.ndarray:
    """Values -> codes: index + 1 in the training vocabulary, 0 for a value never seen in training."""
    index = {v: i + 1 for i, v in enumerate(vocab)}
    return np.array([index.get(str(v), 0) for v in values], dtype=np.int64)


def cleaned_frame(frame: pd.DataFrame, spec: TableSpec) -> pd.DataFrame:
    """Replay cleaning (and feature engineering) on checked raw features: the model's input frame."""
    from dsk.data.table_transform import apply_transform

    clean = apply_transform(frame, spec.transform, keep_label=False)
    if spec.feature_transform is not None:
        from dsk.tabular.features import apply_features

        clean = apply_features(clean, spec.feature_transform)
    return clean


def matrices(clean: pd.DataFrame, spec: TableSpec) -> tuple[np.ndarray, np.ndarray]:
    """The network's (x_num float32 [N, n_numeric], x_cat int64 [N, n_cat]) from a cleaned frame."""
    x_num = clean[spec.inputs_numeric].to_numpy(dtype=np.float32) if spec.inputs_numeric else np.zeros((len(clean), 0), np.float32)
    cats = [encode_categorical(clean[c], vocab) for c, vocab in spec.inputs_categorical.items()]
    x_cat = np.stack(cats, axis=1) if cats else np.zeros((len(clean), 0), np.int64)
    return x_num, x_cat


def model_inputs(frame: pd.DataFrame, spec: TableSpec) -> tuple[np.ndarray, np.ndarray]:
    return matrices(cleaned_frame(frame, spec), spec)


# --------------------------------------------------------------------------- torch path (exportable)


def _torch():
    import torch

    return torch


def make_clean_module(transform: dict[str, Any]):
    """The clean transform as an ``nn.Module``: raw numeric [N, n] float64 (NaN = missing) -> cleaned."""
    torch = _torch()
    nn = torch.nn

    class CleanTransform(nn.Module):
        """Imputation (median or the pooled IterativeImputer chain), clipping, robust scaling.

        The same arithmetic as ``dsk.data.table_transform.apply_transform`` in float64; every op
        is an elementwise ``where``/``maximum``/``minimum`` or a small matmul, so it exports to ONNX.
        """

        def __init__(self) -> None:
            super().__init__()
            numeric = list(transform["numeric"])
            n = len(numeric)
            f64 = torch.float64
            impute = transform["impute"]
            self.method = impute["method"] if n else "none"
            if self.method == "median":
                self.register_buffer("fill", torch.tensor([impute["fill"][c] for c in numeric], dtype=f64))
            self.imputations: list[tuple[int, list[tuple[int, list[int], str, float]]]] = []
            if self.method == "iterative":
                spec = impute["iterative"]
                self.register_buffer("imp_lo", torch.tensor(spec["min"], dtype=f64))
                self.register_buffer("imp_hi", torch.tensor(spec["max"], dtype=f64))
                for m, imp in enumerate(spec["imputations"]):
                    self.register_buffer(f"initial_{m}", torch.tensor(imp["initial"], dtype=f64))
                    steps = []
                    for s, step in enumerate(imp["steps"]):
                        name = f"coef_{m}_{s}"
                        self.register_buffer(name, torch.tensor(step["coef"], dtype=f64).reshape(-1, 1))
                        steps.append((int(step["target"]), [int(j) for j in step["inputs"]], name, float(step["intercept"])))
                    self.imputations.append((m, steps))
            clip = transform.get("clip", {})
            scale = transform.get("scale", {})
            self.register_buffer("lo", torch.tensor([clip[c][0] if c in clip else -math.inf for c in numeric], dtype=f64))
            self.register_buffer("hi", torch.tensor([clip[c][1] if c in clip else math.inf for c in numeric], dtype=f64))
            self.register_buffer("center", torch.tensor([scale[c]["center"] if c in scale else 0.0 for c in numeric], dtype=f64))
            self.register_buffer("scale", torch.tensor([scale[c]["scale"] if c in scale else 1.0 for c in numeric], dtype=f64))

        def forward(self, x):
            missing = torch.isnan(x)
            if self.method == "median":
                x = torch.where(missing, self.fill, x)
            elif self.method == "iterative":
                x = torch.where(missing, self._iterative(x, missing), x)
            x = torch.minimum(torch.maximum(x, self.lo), self.hi)
            return (x - self.center) / self.scale

        def _iterative(self, x, missing):
            pooled = torch.zeros_like(x)
            for m, steps in self.imputations:
                cols = list(torch.where(missing, getattr(self, f"initial_{m}"), x).unbind(1))
                for target, inputs, coef, intercept in steps:
                    if inputs:
                        pred = torch.stack([cols[j] for j in inputs], dim=1) @ getattr(self, coef)
                        pred = pred.squeeze(1) + intercept
                    else:
                        pred = torch.full_like(cols[target], intercept)
                    pred = torch.minimum(torch.maximum(pred, self.imp_lo[target]), self.imp_hi[target])
                    cols[target] = torch.where(missing[:, target], pred, cols[target])
                pooled = pooled + torch.stack(cols, dim=1)
            return pooled / len(self.imputations)

    return CleanTransform()
