"""`dsk featurize` on tables: layout, replayable transform, selection, plots, cache, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dsk.artifacts import Store
from dsk.config import StageParams
from dsk.runtime import run_stage

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "breast_cancer.csv"
LABEL = "diagnosis"


def cleaned_breast_cancer() -> pd.DataFrame:
    """The sample table as clean would leave it: imputed, robust-scaled, plus two planted columns."""
    df = pd.read_csv(SAMPLE)
    num = [c for c in df.columns if c != LABEL]
    df[num] = df[num].fillna(df[num].median())
    iqr = (df[num].quantile(0.75) - df[num].quantile(0.25)).replace(0, 1)
    df[num] = (df[num] - df[num].median()) / iqr
    rng = np.random.default_rng(0)
    df["noise"] = rng.normal(size=len(df))  # pure noise: selection must drop it
    df["site"] = rng.choice(["north", "south", "east"], size=len(df))  # a text column to one-hot
    return df


def make_table_artifact(df: pd.DataFrame, label: str | None = LABEL, store: Store | None = None) -> str:
    """A clean-like table artifact (data.parquet, transform.json, metrics.label_column)."""
    def build(ctx):
        df.to_parquet(ctx.out / "data.parquet", index=False)
        (ctx.out / "transform.json").write_text("{}\n")
        ctx.kind = "table"
        ctx.metrics["label_column"] = label

    import hashlib

    version = hashlib.sha256(pd.util.hash_pandas_object(df).to_numpy().tobytes()).hexdigest()[:12]
    return run_stage(stage="clean", params=StageParams(), inputs=[], build=build, store=store or Store.open(),
                     kind="table", stage_version=f"{version}-{label}").artifact.id


FAST = {"n_estimators": 40, "umap_epochs": 30, "cv_folds": 3, "val_fraction": 0.2}


@pytest.fixture(scope="module")
def table_run(tmp_path_factory):
    """One full run (UMAP included: its first fit JIT-compiles for ~20 s), shared by the tests."""
    import dsk.featurize as fz

    mp = pytest.MonkeyPatch()
    home = tmp_path_factory.mktemp("fztable") / "dskhome"
    mp.setenv("DSK_HOME", str(home))
    try:
        store = Store.open()
        df = cleaned_breast_cancer()
        src = make_table_artifact(df, store=store)
        params = fz.Params(umap_components=2, **FAST)
        result = fz.run(source=src, params=params, store=store)
        again = fz.run(source=src, params=params, store=store)
        yield {"result": result, "again": again, "df": df, "path": result.artifact.path}
    finally:
        mp.undo()


def test_table_layout_and_no_pickle(table_run):
    path = table_run["path"]
    assert table_run["result"].artifact.kind == "features"
    assert sorted(p.name for p in path.iterdir()) == [
        "log.txt", "manifest.json", "rejects.parquet", "report.json", "shap_summary.png", "train.parquet",
        "transform", "umap_scatter.png", "val.parquet"]
    assert sorted(p.name for p in (path / "transform").iterdir()) == ["arrays.safetensors", "transform.json"]


def test_cache_hit(table_run):
    assert not table_run["result"].cached and table_run["again"].cached
    assert table_run["again"].artifact.id == table_run["result"].artifact.id


def test_transform_on_rows_equals_fit_time_features(table_run):
    from dsk.data.table_features import apply_transform, load_transform

    path, df = table_run["path"], table_run["df"]
    transform = load_transform(path)  # from disk: JSON + safetensors only
    for split in ("train", "val"):
        stored = pd.read_parquet(path / f"{split}.parquet")
        assert list(stored.columns) == transform.columns + [LABEL]
        raw_rows = df.loc[stored.index]  # the index keeps the input row numbers
        again = apply_transform(transform, raw_rows.drop(columns=[LABEL]))
        assert np.array_equal(again.to_numpy(), stored[transform.columns].to_numpy())
        assert list(stored[LABEL]) == list(raw_rows[LABEL])
    assert len(set(pd.read_parquet(path / "train.parquet").index) & set(pd.read_parquet(path / "val.parquet").index)) == 0


def test_umap_interpolation_reproduces_training_embedding_and_handles_new_rows(table_run):
    from dsk.data.table_features import apply_transform, load_transform

    path, df = table_run["path"], table_run["df"]
    t = load_transform(path)
    train = pd.read_parquet(path / "train.parquet")
    emb = apply_transform(t, df.loc[train.index], upto="umap")[["umap_0", "umap_1"]].to_numpy()
    assert np.allclose(emb, t.arrays["umap_train_embedding"], atol=0)
    # an unseen row lands inside the cloud of the training embedding
    new = df.loc[train.index[:3]].copy()
    new["mean_radius"] += 0.05
    out = apply_transform(t, new, upto="umap")[["umap_0", "umap_1"]].to_numpy()
    lo, hi = t.arrays["umap_train_embedding"].min(0), t.arrays["umap_train_embedding"].max(0)
    assert np.isfinite(out).all() and (out >= lo).all() and (out <= hi).all()


def test_selection_drops_planted_noise_and_manifest_says_why(table_run):
    path = table_run["path"]
    report = json.loads((path / "report.json").read_text())
    decisions = report["features"]["decisions"]
    assert decisions["noise"]["kept"] is False
    assert "noise" not in report["features"]["selected"]
    assert 0 < len(report["features"]["selected"]) < len(report["features"]["candidates"])
    chosen = table_run["result"].artifact.metrics["selected_features"]
    assert sorted(chosen) == sorted(report["features"]["selected"]) and all(chosen.values())
    # importance is a ranked table and the crosses all passed their thresholds
    shap_values = [r["mean_abs_shap"] for r in report["importance"]]
    assert shap_values == sorted(shap_values, reverse=True)
    for cross in report["crosses"]["kept"]:
        assert cross["label_corr"] >= cross["parents_label_corr"] + 0.02 - 1e-4
        assert cross["max_corr_existing"] < 0.95
    s = report["scores"]
    assert s["metric"] == "roc_auc" and 0.9 < s["cv_raw"] <= 1 and 0.9 < s["cv_engineered"] <= 1


def test_plots_written(table_run):
    for name in ("shap_summary.png", "umap_scatter.png"):
        data = (table_run["path"] / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_multiclass_cli_without_umap(cli):
    from sklearn.datasets import load_wine

    wine = load_wine(as_frame=True).frame.rename(columns={"target": "cultivar"})
    wine["cultivar"] = wine["cultivar"].map({0: "barolo", 1: "grignolino", 2: "barbera"})
    src = make_table_artifact(wine, label=None)
    code, out, err = cli("featurize", src, "--label-column", "cultivar", "--umap-components", "0",
                         "--n-estimators", "20", "--cv-folds", "3", "--json")
    assert code == 0, err
    summary = json.loads(out)
    path = Path(summary["path"])
    assert sorted(p.name for p in path.iterdir()) == [
        "log.txt", "manifest.json", "rejects.parquet", "report.json", "shap_summary.png", "train.parquet",
        "transform", "val.parquet"]
    report = json.loads((path / "report.json").read_text())
    assert report["scores"]["metric"] == "accuracy" and report["classes"] == ["barbera", "barolo", "grignolino"]
    assert set(pd.read_parquet(path / "val.parquet")["cultivar"]) <= set(report["classes"])


def _assert_error(cli, workspace, args, needle):
    code, out, err = cli("featurize", *args)
    assert code == 2, err
    assert needle in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 or needle in err.strip().splitlines()[-1]
    assert not (workspace / "artifacts" / "featurize").exists()


def test_error_missing_label_column(cli, workspace):
    df = cleaned_breast_cancer().head(60)
    _assert_error(cli, workspace, [make_table_artifact(df, label=None)], "names no label column")
    _assert_error(cli, workspace, [make_table_artifact(df), "--label-column", "nope"], "'nope' is not in the table")


def test_error_one_class_label(cli, workspace):
    df = cleaned_breast_cancer().head(60)
    df[LABEL] = 1
    _assert_error(cli, workspace, [make_table_artifact(df)], "has 1 class")


def test_error_non_numeric_column_that_cannot_be_encoded(cli, workspace):
    df = cleaned_breast_cancer().head(60)
    df["free_text"] = [f"note {i}" for i in range(len(df))]
    _assert_error(cli, workspace, [make_table_artifact(df)], "'free_text' is non-numeric with 60 distinct values")
