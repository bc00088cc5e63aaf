"""The table track: clean -> featurize -> pretrain (MoE classifier) -> quantize 8 -> export ONNX
-> /v1/predict and evaluation, on a tiny seeded table with a text column and missing cells."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dsk.artifacts import Store
from dsk.errors import DskError

TINY_TABLE = {"dim": 8, "n_heads": 2, "n_layers": 1, "n_routed_experts": 3, "n_activated_experts": 2,
              "moe_inter_dim": 8, "feature_dim": 4, "n_frequencies": 4, "epochs": 4, "min_epochs": 0, "patience": 3,
              "batch_size": 32, "lr": 0.01, "threads": 1, "n_members": 1}
# the attention variant: one token per feature + [CLS] (the default is one flat token)
TOKENS_TABLE = {**TINY_TABLE, "tokens": "features"}
FAST_FEATURIZE = {"n_estimators": 20, "umap_components": 2, "umap_epochs": 20, "umap_neighbors": 5,
                  "cv_folds": 2, "val_fraction": 0.1}


def make_table(path: Path, n: int = 150, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4))
    color = rng.choice(["red", "green", "blue"], n)
    logit = 1.5 * x[:, 0] - x[:, 1] + 0.8 * (color == "red") + 0.3 * rng.standard_normal(n)
    df = pd.DataFrame({"a": x[:, 0], "b": x[:, 1] * 10 + 3, "c": x[:, 2], "d": np.round(x[:, 3] * 4),
                       "color": color, "outcome": np.where(logit > 0, "yes", "no")})
    df.loc[rng.random(n) < 0.08, "c"] = np.nan
    df.loc[rng.random(n) < 0.05, "b"] = np.nan
    df.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def tables(tmp_path_factory):
    """One store with: clean (label outcome) -> featurize -> pretrain -> quantize 8 -> export onnx,
    and a second model trained on the clean table directly (categorical embedding path)."""
    import dsk.clean as clean
    import dsk.export as export
    import dsk.featurize as featurize
    import dsk.pretrain as pretrain
    import dsk.quantize as quantize

    root = tmp_path_factory.mktemp("table")
    csv = make_table(root / "tiny.csv")
    store = Store.open(root / "home")
    c = clean.run(source=str(csv), params=clean.Params(label="outcome", outlier_action="clip", label_issues="off"),
                  store=store)
    f = featurize.run(source=c.artifact.id, params=featurize.Params(**FAST_FEATURIZE), store=store)
    p = pretrain.run(source=f.artifact.id, params=pretrain.Params(table=TINY_TABLE), store=store)
    q = quantize.run(source=p.artifact.id, params=quantize.Params(bits=8), store=store)
    e = export.run(source=q.artifact.id, params=export.Params(format="onnx"), store=store)
    plain = pretrain.run(source=c.artifact.id, params=pretrain.Params(table=TINY_TABLE), store=store)
    plain_e = export.run(source=plain.artifact.id, params=export.Params(format="onnx"), store=store)
    tokens = pretrain.run(source=c.artifact.id, params=pretrain.Params(table=TOKENS_TABLE), store=store)
    tokens_e = export.run(source=tokens.artifact.id, params=export.Params(format="onnx"), store=store)
    ensemble = pretrain.run(source=c.artifact.id, params=pretrain.Params(table={**TINY_TABLE, "n_members": 2}),
                            store=store)
    ensemble_q = quantize.run(source=ensemble.artifact.id, params=quantize.Params(bits=8), store=store)
    ensemble_e = export.run(source=ensemble_q.artifact.id, params=export.Params(format="onnx"), store=store)
    return {"tokens": tokens, "tokens_onnx": tokens_e, "ensemble": ensemble, "ensemble_onnx": ensemble_e, "csv": csv, "store": store, "clean": c, "features": f, "model": p, "quantized": q, "onnx": e,
            "plain": plain, "plain_onnx": plain_e}


def files(art) -> list[str]:
    return sorted(str(p.relative_to(art.path)) for p in art.path.rglob("*") if p.is_file())


def raw_rows(csv: Path) -> pd.DataFrame:
    return pd.read_csv(csv).drop(columns=["outcome"])


# --------------------------------------------------------------------------- the pipeline


def test_artifact_layouts(tables):
    m, q, e = tables["model"].artifact, tables["quantized"].artifact, tables["onnx"].artifact
    assert (m.kind, q.kind, e.kind) == ("table-model", "table-model", "table-onnx")
    assert files(m) == ["config.json", "curves.png", "feature_transform/arrays.safetensors",
                        "feature_transform/transform.json", "log.txt", "manifest.json", "metrics.jsonl",
                        "model.safetensors", "transform.json"]
    assert files(q) == ["config.json", "feature_transform/arrays.safetensors", "feature_transform/transform.json",
                        "log.txt", "manifest.json", "model.safetensors", "quantize_report.json", "transform.json"]
    assert files(e) == ["config.json", "feature_transform/arrays.safetensors", "feature_transform/transform.json",
                        "log.txt", "manifest.json", "model.onnx", "transform.json"]
    assert files(tables["plain"].artifact) == ["config.json", "curves.png", "log.txt", "manifest.json",
                                               "metrics.jsonl", "model.safetensors", "transform.json"]
    history = [json.loads(line) for line in (m.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == list(range(1, len(history) + 1))
    assert m.metrics["best_epoch"] in [r["epoch"] for r in history]
    assert 0.5 <= m.metrics["val_auc"] <= 1.0
    cfg = json.loads((q.path / "config.json").read_text())
    assert cfg["quantization"]["bits"] == 8 and cfg["classes"] == ["no", "yes"]
    assert q.metrics["weight_bytes_quantized"] < q.metrics["weight_bytes_float"]
    assert "val_auc_quantized" in q.metrics and q.metrics["prediction_agreement"] >= 0.9


def test_quantized_weights_are_int8(tables):
    from safetensors.numpy import load_file

    state = load_file(str(tables["quantized"].artifact.path / "model.safetensors"))
    int8 = [k for k, v in state.items() if v.dtype == np.int8]
    assert any(k.endswith("experts.qw1") for k in int8) and any(k.endswith("attn.wq.qweight") for k in int8)
    assert all(not k.endswith("gate.weight") for k in int8)  # routers stay float


def test_cache_hit(tables):
    import dsk.pretrain as pretrain

    again = pretrain.run(source=tables["features"].artifact.id, params=pretrain.Params(table=TINY_TABLE),
                         store=tables["store"])
    assert again.cached and again.artifact.id == tables["model"].artifact.id


def test_same_seed_same_bytes(tables, tmp_path):
    import dsk.pretrain as pretrain

    again = pretrain.run(source=tables["features"].artifact.id, params=pretrain.Params(table=TINY_TABLE),
                         store=tables["store"], force=True)
    assert (again.artifact.path / "model.safetensors").read_bytes() == \
        (tables["model"].artifact.path / "model.safetensors").read_bytes()


# --------------------------------------------------------------------------- ONNX == torch on raw rows


@pytest.mark.parametrize("which", ["onnx", "plain_onnx", "tokens_onnx", "ensemble_onnx"])
def test_onnx_equals_torch_on_raw_rows(tables, which):
    """Raw CSV rows (missing cells, a text column) through the ONNX graph vs the torch module
    with the same folded transforms vs the reference path (numpy transforms + torch model)."""
    import torch

    from dsk.tabular.export import RawTableModel, onnx_inputs, onnx_predict
    from dsk.tabular.io import load_table_model
    from dsk.tabular.predict import TablePredictor
    from dsk.tabular.preprocess import check_frame

    exported = tables[which].artifact
    parent = tables["store"].find_by_id(exported.input_ids[0])
    frame = raw_rows(tables["csv"])
    frame.loc[0, "color"] = "purple"  # unseen category
    frame.loc[1, ["a", "c"]] = np.nan
    model, spec = load_table_model(parent.path)
    checked = check_frame(frame, spec)
    assert checked["c"].isna().sum() >= 2 and checked["b"].isna().any()
    feeds = onnx_inputs(checked, spec)
    got = onnx_predict(exported.path / "model.onnx", feeds)
    with torch.no_grad():
        args = [torch.from_numpy(feeds["numeric"])] + ([torch.from_numpy(feeds["categorical"])] if "categorical" in feeds else [])
        torch_raw = RawTableModel(model, spec).eval()(*args).numpy()
    reference = TablePredictor.load(parent.path).predict_frame(checked)
    assert got.shape == (len(frame), 2)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    assert np.abs(got - torch_raw).max() < 1e-5
    assert np.abs(got - reference).max() < 1e-5
    assert exported.metrics["onnx_max_abs_diff"] < 1e-4


def test_refit_trains_on_every_row_for_the_chosen_epochs():
    """The validation split picks the epoch count; the returned model then trains on all rows."""
    import torch

    from dsk.tabular.params import TableParams
    from dsk.tabular.train import fit

    rng = np.random.default_rng(0)
    x = rng.standard_normal((120, 3)).astype(np.float32)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    none = np.zeros((120, 0), np.int64)
    common = {**TINY_TABLE, "epochs": 6, "min_epochs": 3, "patience": 2}
    kept = fit(x, none, y, n_classes=2, params=TableParams(**common, refit=False), seed=0)
    refit = fit(x, none, y, n_classes=2, params=TableParams(**common, refit=True), seed=0)
    assert kept.n_train == 102 and kept.n_val == 18 and kept.refit_epochs == 0
    assert refit.n_train == 120 and refit.refit_epochs == refit.best_epoch == kept.best_epoch
    assert 3 <= kept.best_epoch <= 6  # epochs before min_epochs are never kept
    with torch.no_grad():
        a, b = kept.model(torch.from_numpy(x), None)[0], refit.model(torch.from_numpy(x), None)[0]
    assert not np.allclose(a.numpy(), b.numpy())


def test_ensemble_averages_its_members_probabilities(tables):
    import torch

    from dsk.tabular.io import load_table_model
    from dsk.tabular.model import TableEnsemble

    model, spec = load_table_model(tables["ensemble"].artifact.path)
    assert isinstance(model, TableEnsemble) and len(model.members) == 2
    assert tables["ensemble"].artifact.metrics["n_members"] == 2
    x = torch.randn(16, len(spec.inputs_numeric))
    codes = torch.ones(16, len(spec.inputs_categorical), dtype=torch.long)
    with torch.no_grad():
        each = [m(x, codes)[0].softmax(-1) for m in model.members]
        mean = model(x, codes)[0].softmax(-1)
    assert not torch.allclose(each[0], each[1], atol=1e-4)  # different seeds, different networks
    torch.testing.assert_close(mean, (each[0] + each[1]) / 2, atol=1e-6, rtol=1e-5)


def test_old_config_without_new_keys_loads_as_linear_feature_tokens():
    from dsk.tabular.model import TableClassifier, TableConfig

    cfg = TableConfig.from_dict({"n_numeric": 3, "cat_cardinalities": [], "n_classes": 2, "dim": 8, "n_heads": 2})
    assert cfg.tokens == "features" and cfg.num_embedding == "linear"
    model = TableClassifier(cfg)
    assert tuple(model.num_weight.shape) == (3, 8) and model.cls.shape[-1] == 8


def test_onnx_graph_keeps_int8_weights(tables):
    import onnx

    graph = onnx.load(str(tables["onnx"].artifact.path / "model.onnx")).graph
    int8 = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(int8) >= 4


def test_clean_transform_in_torch_equals_numpy_with_iterative_imputation(tmp_path):
    import torch

    import dsk.clean as clean
    from dsk.data.table_transform import apply_transform, load_transform
    from dsk.tabular.preprocess import make_clean_module

    csv = make_table(tmp_path / "t.csv", n=80, seed=3)
    store = Store.open(tmp_path / "home")
    c = clean.run(source=str(csv), params=clean.Params(label="outcome", impute="iterative", n_imputations=2,
                                                       label_issues="off", outlier_action="clip"), store=store)
    t = load_transform(c.artifact.path)
    assert t["impute"]["method"] == "iterative"
    frame = pd.read_csv(csv)
    expected = apply_transform(frame, t, keep_label=False)[t["numeric"]].to_numpy()
    with torch.no_grad():
        got = make_clean_module(t)(torch.from_numpy(frame[t["numeric"]].to_numpy(dtype=np.float64))).numpy()
    assert np.isnan(frame[t["numeric"]].to_numpy()).any()
    np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------- /v1/predict and eval


@pytest.fixture(scope="module")
def client(tables):
    from fastapi.testclient import TestClient

    from dsk.serve.params import Params
    from dsk.serve.stage import build_app

    app, engine, config = build_app(tables["onnx"].artifact, Params(), api_keys=[])
    assert engine is None
    with TestClient(app) as c:
        yield c


def test_predict_round_trip(tables, client):
    from dsk.tabular.predict import TablePredictor

    frame = raw_rows(tables["csv"]).head(5)
    rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()}
            for r in frame.to_dict("records")]
    r = client.post("/v1/predict", json={"rows": rows})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["classes"] == ["no", "yes"] and len(body["probabilities"]) == 5
    expected = TablePredictor.load(tables["quantized"].artifact.path)(rows)
    np.testing.assert_allclose(body["probabilities"], expected["probabilities"], atol=1e-5)
    assert body["labels"] == [body["classes"][int(np.argmax(p))] for p in body["probabilities"]]


@pytest.mark.parametrize("mutate, column", [
    (lambda r: r.pop("b"), "'b'"),
    (lambda r: r.update(extra=1), "'extra'"),
    (lambda r: r.update(outcome="yes"), "'outcome'"),
    (lambda r: r.update(a="high"), "'a'"),
    (lambda r: r.update(a=True), "'a'"),
    (lambda r: r.update(color=[1]), "'color'"),
])
def test_predict_bad_rows_are_400_naming_the_column(tables, client, mutate, column):
    row = {k: (None if isinstance(v, float) and math.isnan(v) else v)
           for k, v in raw_rows(tables["csv"]).iloc[0].to_dict().items()}
    mutate(row)
    r = client.post("/v1/predict", json={"rows": [row]})
    assert r.status_code == 400
    assert column in r.json()["error"]["message"]


def test_predict_body_shape_errors(client):
    assert client.post("/v1/predict", json={"rows": []}).status_code == 400
    assert client.post("/v1/predict", json={"data": []}).status_code == 400


def test_nan_where_nothing_imputes_names_the_column():
    from dsk.tabular.preprocess import TableSpec, check_frame, rows_to_frame

    spec = TableSpec(label="y", classes=[0, 1], inputs_numeric=["a", "b"], inputs_categorical={},
                     transform={"features": ["a", "b"], "numeric": ["a", "b"], "impute": {"method": "none"}})
    with pytest.raises(ValueError, match="'b'.*missing value"):
        rows_to_frame([{"a": 1.0, "b": None}], spec)
    with pytest.raises(ValueError, match="'a'.*infinite"):
        check_frame(pd.DataFrame({"a": [np.inf], "b": [1.0]}), spec)
    assert rows_to_frame([{"a": 1, "b": 2.5}], spec).dtypes.tolist() == [np.float64, np.float64]


def test_evaluate_table_metrics_and_errors(tables, tmp_path):
    from dsk.tabular.evaluate import evaluate_table

    m = evaluate_table(tables["onnx"].artifact.path, tables["csv"], plot=tmp_path / "cal.png")
    assert 0.5 < m["roc_auc"] <= 1.0 and 0 <= m["f1"] <= 1 and 0 <= m["accuracy"] <= 1
    assert sum(m["calibration"]["count"]) == m["n_rows"] == 150
    assert (tmp_path / "cal.png").stat().st_size > 0
    same = evaluate_table(tables["quantized"].artifact.path, tables["csv"])
    assert abs(same["roc_auc"] - m["roc_auc"]) < 1e-6

    df = pd.read_csv(tables["csv"])
    for name, bad, message in [
        ("nolabel.csv", df.drop(columns=["outcome"]), "label column 'outcome' is missing"),
        ("missing.csv", df.drop(columns=["d"]), "missing column 'd'"),
        ("extra.csv", df.assign(zzz=1), "unexpected column 'zzz'"),
        ("type.csv", df.assign(a=["x"] * len(df)), "column 'a' expects numbers"),
        ("label.csv", df.assign(outcome=["maybe"] * len(df)), "value 'maybe'"),
    ]:
        bad.to_csv(tmp_path / name, index=False)
        with pytest.raises(DskError, match=message):
            evaluate_table(tables["onnx"].artifact.path, tmp_path / name)


# --------------------------------------------------------------------------- CLI error paths


def test_cli_pretrain_on_unlabelled_table_is_exit_2(cli, workspace, tmp_path):
    csv = make_table(tmp_path / "t.csv", n=60)
    code, _, _ = cli("clean", str(csv), "--quiet")
    assert code == 0
    code, _, err = cli("pretrain", "clean:latest", "--table", "{epochs: 1}")
    assert code == 2 and "no label column" in err
    assert not (workspace / "artifacts" / "pretrain").exists() or not any((workspace / "artifacts" / "pretrain").iterdir())


def test_cli_bad_table_options_are_exit_2(cli, workspace):
    code, _, err = cli("pretrain", "--table", "{dim: 10, n_heads: 4}")
    assert code == 2 and "n_heads" in err
    code, _, err = cli("pretrain", "--table", "{bogus: 1}")
    assert code == 2 and "bogus" in err


def test_table_model_quantize_options_and_double_quantize_are_errors(tables):
    import dsk.quantize as quantize

    with pytest.raises(DskError, match="weight-only"):
        quantize.run(source=tables["model"].artifact.id, params=quantize.Params(bits=8, scheme="dynamic"),
                     store=tables["store"])
    with pytest.raises(DskError, match="already quantized"):
        quantize.run(source=tables["quantized"].artifact.id, params=quantize.Params(bits=8), store=tables["store"])


def test_table_export_formats_other_than_onnx_are_errors(tables):
    import dsk.export as export

    with pytest.raises(DskError, match="onnx only"):
        export.run(source=tables["model"].artifact.id, params=export.Params(format="hf"), store=tables["store"])


def test_dsk_eval_on_table_models(tables, cli, monkeypatch):
    """`dsk eval` on a table model (its validation rows) and on its ONNX export with --data."""
    import json as _json

    monkeypatch.setenv("DSK_HOME", str(tables["store"].root))
    code, out, err = cli("eval", tables["model"].artifact.id, "--json")
    assert code == 0, err
    summary = _json.loads(out)
    assert summary["kind"] == "eval" and 0.5 <= summary["metrics"]["roc_auc"] <= 1.0
    assert sorted(p.name for p in Path(summary["path"]).iterdir()) == [
        "calibration.json", "calibration.png", "log.txt", "manifest.json"]
    code, out, err = cli("eval", tables["onnx"].artifact.id, "--data", str(tables["csv"]), "--json")
    assert code == 0, err
    assert 0.5 <= _json.loads(out)["metrics"]["roc_auc"] <= 1.0
    code, _, err = cli("eval", tables["model"].artifact.id, "--data", "nope.csv")
    assert code == 2 and "nope.csv" in err
