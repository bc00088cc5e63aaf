"""`dsk pretrain` on a table: train the MoE table classifier into a `table-model` artifact.

The pretrain stage hands a `table` (from `dsk clean`) or `features` (from `dsk featurize`)
input to :func:`run_pretrain`; its ``table`` parameter block (:class:`TableParams`) sets the
network and the training recipe.

    $ dsk clean data/sample/breast_cancer.csv --label diagnosis
    $ dsk featurize && dsk pretrain --table '{epochs: 100}'

Artifact files: ``model.safetensors``, ``config.json``, ``transform.json`` (the clean
transform), ``feature_transform/`` (the featurize transform, when trained on features),
``metrics.jsonl`` (one line per epoch), ``curves.png``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dsk.artifacts import Artifact, Store
from dsk.errors import DskError
from dsk.runtime import StageContext, StageResult, run_stage

STAGE_VERSION = "table-1"
TABLE_KINDS = ("table", "features")
EXCLUDED_COLUMNS = ("_label_issue",)


def is_table_input(inp: Any) -> bool:
    return isinstance(inp, Artifact) and inp.kind in TABLE_KINDS


def table_params(params: Any):
    """The TableParams block of the pretrain params (or the TableParams themselves)."""
    from dsk.tabular.params import TableParams

    return params if isinstance(params, TableParams) else getattr(params, "table")


def run_pretrain(*, inputs: list, params: Any, seed: int = 0, force: bool = False,
                 store: Store | None = None) -> StageResult:
    """Train a table classifier on ``inputs[0]`` (a table or features artifact)."""
    store = store or Store.open()
    training_data(store, inputs[0])  # every input problem is an error before anything runs
    return run_stage(stage="pretrain", params=params, inputs=inputs, build="dsk.tabular.stage:build",
                     seed=seed, force=force, store=store, kind="table-model", stage_version=STAGE_VERSION)


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
        data_path = src.path / "train.parquet"
        feature_dir = src.path / "transform"
        if not feature_dir.is_dir():
            raise DskError(f"features artifact {src.id} has no transform/ directory; rerun `dsk featurize --force`")
    else:
        data_path, feature_dir = src.path / "data.parquet", None
    if not data_path.is_file():
        raise DskError(f"{src.stage} artifact {src.id} has no {data_path.name}; rerun `dsk {src.stage} --force`")
    return {"data": data_path, "transform": transform_path, "features": feature_dir, "label": label,
            "clean_id": clean.id}


def load_training_table(data_path: Path, label: str):
    """(frame, numeric input columns, categorical input columns, classes, y as class indices)."""
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(data_path)
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


def _json_value(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def build(ctx: StageContext) -> None:
    import numpy as np

    from dsk import console
    from dsk.tabular.io import save_table_model
    from dsk.tabular.preprocess import TableSpec, matrices
    from dsk.tabular.train import fit
    from dsk.tabular.plots import plot_curves

    tp = table_params(ctx.params)
    src = ctx.input
    info = training_data(ctx.store, src)
    df, numeric, categorical, classes, y = load_training_table(info["data"], info["label"])
    vocab = {c: sorted({str(v) for v in df[c].dropna()}) for c in categorical}
    spec = TableSpec(label=info["label"], classes=[_json_value(c) for c in classes],
                     transform=json.loads(info["transform"].read_text()), inputs_numeric=numeric,
                     inputs_categorical=vocab)
    x_num, x_cat = matrices(df, spec)
    ctx.log.info(f"table: {len(df):,} rows, {len(numeric)} numeric + {len(categorical)} categorical features, "
                 f"{len(classes)} classes {np.bincount(y).tolist()}")

    with console.progress_task("training table classifier", tp.epochs) as advance:
        def on_epoch(row: dict[str, Any]) -> None:
            advance(1, status=f"val AUC {row['val_auc']:.4f} loss {row['val_loss']:.4f}")

        result = fit(x_num, x_cat, y, n_classes=len(classes), params=tp,
                     cat_cardinalities=[len(v) + 1 for v in vocab.values()], seed=ctx.seed, log=ctx.log,
                     on_epoch=on_epoch)
    model = result.model
    meta = {
        **spec.to_json(),
        "quantization": None,
        "training": {"input": src.id, "clean": info["clean_id"], "seed": ctx.seed, "val_fraction": tp.val_fraction,
                     "rows": len(df), "class_weights": result.class_weights},
    }
    save_table_model(model, ctx.out, meta, transform_src=info["transform"], feature_transform_src=info["features"])
    with open(ctx.out / "metrics.jsonl", "w") as fh:
        for row in result.history:
            fh.write(json.dumps({k: v for k, v in row.items() if k != "seconds"}, sort_keys=True) + "\n")
    plot_curves(result.history, ctx.out / "curves.png", title=f"table classifier {ctx.out.name[:12]}",
                best_epoch=result.best_epoch)
    ctx.kind = "table-model"
    ctx.metrics.update({
        "val_auc": result.best_val_auc, "val_accuracy": result.best_val_accuracy, "val_loss": result.best_val_loss,
        "best_epoch": result.best_epoch, "epochs": result.epochs, "steps": result.steps,
        "stopped_by": result.stopped_by, "train_seconds": round(result.seconds, 3), "n_train": result.n_train,
        "n_val": result.n_val, "n_params": model.num_params(), "n_classes": len(classes),
        "n_features": len(numeric) + len(categorical), "label_column": info["label"],
    })
    ctx.key_metric = "val_auc"
    ctx.log.info(f"table classifier: {model.num_params():,} params, best val AUC {result.best_val_auc:.4f} "
                 f"(accuracy {result.best_val_accuracy:.4f}) at epoch {result.best_epoch}/{result.epochs}")
