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

from dsk.tabular.data import TABLE_KINDS, is_table_input, load_training_table, training_data

STAGE_VERSION = "table-1"


def table_params(params: Any):
    """The TableParams block of the pretrain params (or the TableParams themselves)."""
    from dsk.tabular.params import TableParams

    return params if isinstance(params, TableParams) else getattr(params, "table")


def run_pretrain(*, inputs: list, params: Any, seed: int = 0, force: bool = False,
                 store: Store | None = None) -> StageResult:
    """Train a table classifier on ``inputs[0]`` (a table or features artifact)."""
    store = store or Store.open()
    training_data(store, inputs[0])  # every input problem is an error before anything runs
    ignored = language_model_options(params)
    if ignored:
        from dsk import console

        console.warn(f"pretrain on a table uses the `table` options; ignoring {', '.join(ignored)} "
                     f"(language-model options)")
    return run_stage(stage="pretrain", params=params, inputs=inputs, build="dsk.tabular.stage:build",
                     seed=seed, force=force, store=store, kind="table-model", stage_version=STAGE_VERSION)


def _json_value(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


def language_model_options(params: Any) -> list[str]:
    """Options set away from their defaults that only apply to language models."""
    fields = getattr(type(params), "model_fields", {})
    if "table" not in fields:
        return []
    default = type(params)()
    return [f"--{k.replace('_', '-')}" for k in fields if k != "table" and getattr(params, k) != getattr(default, k)]


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

    with console.progress_task("training table classifier", tp.epochs * tp.n_members) as advance:
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
        "n_val": result.n_val, "n_params": model.num_params(), "n_members": tp.n_members, "n_classes": len(classes),
        "n_features": len(numeric) + len(categorical), "label_column": info["label"],
    })
    ctx.key_metric = "val_auc"
    ctx.log.info(f"table classifier: {model.num_params():,} params, best val AUC {result.best_val_auc:.4f} "
                 f"(accuracy {result.best_val_accuracy:.4f}) at epoch {result.best_epoch}/{result.epochs}")
    print_summary(ctx.metrics, classes)


def print_summary(metrics: dict[str, Any], classes: list[Any]) -> None:
    from dsk import console

    if console.is_quiet():
        return
    from rich.table import Table

    t = Table(title="pretrain (table classifier)", title_justify="left", show_header=False)
    t.add_column("", style="bold")
    t.add_column("")
    t.add_row("rows", f"{metrics['n_train']:,} train, {metrics['n_val']:,} validation")
    t.add_row("features / classes", f"{metrics['n_features']} / {len(classes)} ({', '.join(map(str, classes[:10]))})")
    t.add_row("parameters", f"{metrics['n_params']:,}")
    t.add_row("validation", f"ROC-AUC {metrics['val_auc']:.4f}, accuracy {metrics['val_accuracy']:.4f}, "
              f"loss {metrics['val_loss']:.4f}")
    t.add_row("epochs", f"best {metrics['best_epoch']} of {metrics['epochs']} ({metrics['stopped_by']})")
    console.console.print(t)


# --------------------------------------------------------------------------- quantize / export


def is_table_model_input(inp: Any) -> bool:
    return isinstance(inp, Artifact) and inp.kind in ("table-model", "table-onnx")


def run_quantize(*, inputs: list, params: Any, seed: int = 0, force: bool = False,
                 store: Store | None = None) -> StageResult:
    """`dsk quantize` on a table-model artifact: weight-only int8/int4/fp16 (``params.bits``)."""
    store = store or Store.open()
    src = inputs[0]
    if not isinstance(src, Artifact) or src.kind != "table-model":
        raise DskError("table quantization reads a table-model artifact from `dsk pretrain` on a table")
    bits = int(getattr(params, "bits", 8))
    if bits not in (4, 8, 16):
        raise DskError(f"table models quantize to 16, 8 or 4 bits, not {bits}; pass --bits 8")
    if getattr(params, "backend", "torch") != "torch" or getattr(params, "scheme", "weight-only") != "weight-only":
        raise DskError("table models support --backend torch --scheme weight-only (int8 per-channel weights); "
                       "drop --backend/--scheme")
    if (src.metrics or {}).get("quantized_bits") or json.loads((src.path / "config.json").read_text()).get("quantization"):
        raise DskError(f"{src.id} is already quantized; quantize the float model from `dsk pretrain`")
    return run_stage(stage="quantize", params=params, inputs=inputs, build="dsk.tabular.stage:build_quantize",
                     seed=seed, force=force, store=store, kind="table-model", stage_version=STAGE_VERSION)


def build_quantize(ctx: StageContext) -> None:
    from dsk.tabular.quantize import quantize_artifact

    bits = int(getattr(ctx.params, "bits", 8))
    metrics = quantize_artifact(ctx.input.path, ctx.out, bits=bits, store=ctx.store, log=ctx.log)
    ctx.kind = "table-model"
    ctx.metrics.update({**metrics, "quantized_bits": bits})
    ctx.key_metric = "val_auc_quantized" if "val_auc_quantized" in metrics else "compression"


def run_export(*, inputs: list, params: Any, seed: int = 0, force: bool = False,
               store: Store | None = None) -> StageResult:
    """`dsk export --format onnx` on a table-model artifact: raw rows in, probabilities out."""
    store = store or Store.open()
    src = inputs[0]
    if not isinstance(src, Artifact) or src.kind != "table-model":
        raise DskError("table export reads a table-model artifact from `dsk pretrain` or `dsk quantize`")
    fmt = getattr(params, "format", "onnx")
    if fmt != "onnx":
        raise DskError(f"table models export to onnx only, not {fmt!r}; pass --format onnx "
                       f"(the table-model artifact itself is already safetensors)")
    return run_stage(stage="export", params=params, inputs=inputs, build="dsk.tabular.stage:build_export",
                     seed=seed, force=force, store=store, kind="table-onnx", stage_version=STAGE_VERSION)


def build_export(ctx: StageContext) -> None:
    from dsk.tabular.export import export_onnx

    metrics = export_onnx(ctx.input.path, ctx.out, seed=ctx.seed, log=ctx.log,
                          tolerance=float(getattr(ctx.params, "tolerance", 1e-4)),
                          opset=int(getattr(ctx.params, "opset", 17)))
    ctx.kind = "table-onnx"
    ctx.metrics.update(metrics)
    ctx.key_metric = "onnx_max_abs_diff"
