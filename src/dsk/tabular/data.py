"""The training table behind a `table` (clean) or `features` (featurize) artifact, checked.

    >>> info = training_data(store, artifact)      # data path, transform.json, feature transform, label
    >>> df, numeric, categorical, classes, y = load_training_table(info["data"], info["label"])
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact, Store
from dsk.errors import DskError

TABLE_KINDS = ("table", "features")
EXCLUDED_COLUMNS = ("_label_issue",)


def is_table_input(inp: Any) -> bool:
    return isinstance(inp, Artifact) and inp.kind in TABLE_KINDS


def clean_ancestor(store: Store, art: Artifact) -> Artifact:
    """The `dsk clean` table artifact this artifact descends from (itself if it is one)."""
    seen = set()
    todo = [art]
    while todo:
        a = todo.pop(0)
        if a.id in seen:
            continue
        seen.add(a.id)
        if a.stage == "clean" and a.kind == "table":
            return a
        for i in a.input_ids:
            found = store.find_by_id(i)
            if found is not None:
                todo.append(found)
    raise DskError(f"{art.stage} artifact {art.id} does not descend from a `dsk clean` table; "
                   f"its transform.json is needed to take raw rows")


def training_data(store: Store, src: Artifact) -> dict[str, Any]:
    """Paths and label of the training table behind a table/features artifact, checked."""
    if not is_table_input(src):
        raise DskError(f"table training reads a table or features artifact, got {src.kind!r}")
    clean = clean_ancestor(store, src)
    transform_path = clean.path / "transform.json"
    if not transform_path.is_file():
        raise DskError(f"clean artifact {clean.id} has no transform.json; rerun `dsk clean ... --force`")
    label = json.loads(transform_path.read_text()).get("label")
    if not label:
        raise DskError(f"the table in {clean.id} has no label column; rerun `dsk clean FILE --label COLUMN`")
    if src.kind == "features":
        # featurize's val.parquet rows went through the saved transform only: they train here
        # too, and the classifier holds out its own stratified validation split
        data_path = [p for p in (src.path / "train.parquet", src.path / "val.parquet") if p.is_file()]
        feature_dir = src.path / "transform"
        if not feature_dir.is_dir():
            raise DskError(f"features artifact {src.id} has no transform/ directory; rerun `dsk featurize --force`")
    else:
        data_path, feature_dir = [src.path / "data.parquet"], None
    if not data_path or not data_path[0].is_file():
        raise DskError(f"{src.stage} artifact {src.id} has no {'train' if feature_dir else 'data'}.parquet; "
                       f"rerun `dsk {src.stage} --force`")
    return {"data": data_path, "transform": transform_path, "features": feature_dir, "label": label,
            "clean_id": clean.id}


def load_training_table(data_path: list[Path], label: str):
    """(frame, numeric input columns, categorical input columns, classes, y as class indices)."""
    import numpy as np
    import pandas as pd

    df = pd.concat([pd.read_parquet(p) for p in data_path], ignore_index=True)
    data_path = data_path[0]
    if label not in df.columns:
        raise DskError(f"{data_path}: label column {label!r} is missing; rerun the upstream stage")
    df = df[df[label].notna()].reset_index(drop=True)
    features = [c for c in df.columns if c != label and c not in EXCLUDED_COLUMNS]
    numeric = [c for c in features if pd.api.types.is_numeric_dtype(df[c]) and not pd.api.types.is_bool_dtype(df[c])]
    categorical = [c for c in features if c not in numeric]
    if not features:
        raise DskError(f"{data_path}: no feature columns besides the label {label!r}")
    if numeric and not np.isfinite(df[numeric].to_numpy(dtype=float)).all():
        bad = next(c for c in numeric if not np.isfinite(df[c].to_numpy(dtype=float)).all())
        raise DskError(f"{data_path}: column {bad!r} has missing or infinite values; clean with --impute median")
    classes = sorted(df[label].unique().tolist(), key=lambda v: (str(type(v)), v))
    if len(classes) < 2:
        raise DskError(f"label {label!r} has a single class ({classes[0]!r}); a classifier needs at least two")
    index = {c: i for i, c in enumerate(classes)}
    y = df[label].map(index).to_numpy(dtype=np.int64)
    return df, numeric, categorical, classes, y
