"""Table rules on a planted table: duplicates, a known outlier, a flipped label, imputation, replay."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from dsk.data.table_transform import apply_transform, load_transform


@pytest.fixture
def planted(tmp_path):
    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 3))
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).astype(int)
    df = pd.DataFrame({"f0": x[:, 0] * 2 + 10, "f1": x[:, 1], "f2": x[:, 2] * 5, "color": rng.choice(["red", "blue"], n),
                       "target": y})
    # a confidently classified row (far from the boundary, yet no 3-sigma value), label flipped
    margin = np.abs(x[:, 0] + 0.5 * x[:, 1])
    margin[(np.abs(x) > 2.2).any(axis=1)] = 0
    flipped = int(np.argmax(margin))
    df.loc[flipped, "target"] = 1 - df.loc[flipped, "target"]
    outlier = 7 if flipped != 7 else 8
    df.loc[outlier, "f2"] = 500.0              # ~100 sigma
    df.loc[[20, 21, 22], "f1"] = np.nan        # missing values
    df.loc[23, "color"] = None
    df = pd.concat([df, df.iloc[[30, 31]]], ignore_index=True)  # rows 240, 241 duplicate 30, 31
    path = tmp_path / "planted.csv"
    df.to_csv(path, index=False)
    return path, df, flipped, outlier


def _run(cli, path, *extra):
    code, out, err = cli("clean", str(path), "--label", "target", "--json", *extra)
    assert code == 0, err
    art = Path(json.loads(out)["path"])
    return art, pd.read_parquet(art / "data.parquet"), pd.read_parquet(art / "rejects.parquet"), \
        json.loads((art / "report.json").read_text())


def test_each_rule_removes_what_it_should_and_nothing_else(cli, planted):
    path, df, flipped, outlier = planted
    art, data, rejects, report = _run(cli, path)
    reason = dict(zip(rejects["_row"], rejects["_reason"]))
    assert reason[240] == "duplicate_row" and reason[241] == "duplicate_row"
    assert reason[outlier] == "outlier"
    assert reason[flipped] == "label_issue"
    # nothing else: a 3-feature Gaussian table has few 3-sigma rows and few label issues
    assert sum(r == "outlier" for r in reason.values()) <= 5
    assert sum(r == "label_issue" for r in reason.values()) <= 6
    assert len(data) + len(rejects) == len(df)
    assert 20 not in reason and 21 not in reason  # rows with missing values are imputed, not dropped
    assert not data.isna().any().any()
    assert list(data.columns) == ["f0", "f1", "f2", "color", "target"]
    # robust scaling: median 0 for each numeric feature of the kept rows
    assert np.allclose(data[["f0", "f1", "f2"]].median(), 0, atol=1e-9)
    assert report["columns_before"]["f1"]["missing"] == 3 and report["columns_after"]["f1"]["missing"] == 0


def test_transform_replays_on_new_rows(cli, planted):
    path, df, flipped, outlier = planted
    art, data, rejects, _ = _run(cli, path)
    transform = load_transform(art)
    kept_rows = df.drop(index=rejects["_row"]).reset_index(drop=True)
    replayed = apply_transform(kept_rows, transform)
    pd.testing.assert_frame_equal(replayed, data, check_dtype=False)
    new = pd.DataFrame({"f0": [10.0], "f1": [np.nan], "f2": [0.0], "color": [None]})
    out = apply_transform(new, transform)
    assert np.isfinite(out[["f0", "f1", "f2"]].to_numpy()).all() and out.at[0, "color"] in ("red", "blue")
    with pytest.raises(ValueError, match="f2"):
        apply_transform(new.drop(columns="f2"), transform)


def test_clip_keeps_outlier_row_with_clipped_value(cli, planted):
    path, df, flipped, outlier = planted
    art, data, rejects, report = _run(cli, path, "--outlier-action", "clip", "--label-issues", "mark", "--no-scale")
    assert "outlier" not in set(rejects["_reason"]) and "label_issue" not in set(rejects["_reason"])
    kept = df.drop(index=rejects["_row"])
    pos = list(kept.index).index(outlier)
    lo, hi = load_transform(art)["clip"]["f2"]
    assert data.at[pos, "f2"] == pytest.approx(hi) and hi < 100
    assert bool(data.at[list(kept.index).index(flipped), "_label_issue"]) is True


def test_mad_outliers_and_iterative_imputation(cli, planted):
    path, df, flipped, outlier = planted
    art, data, rejects, report = _run(cli, path, "--outliers", "mad", "--impute", "iterative", "--n-imputations", "3")
    reason = dict(zip(rejects["_row"], rejects["_reason"]))
    assert reason[outlier] == "outlier"
    assert not data.isna().any().any()
    spec = load_transform(art)["impute"]
    assert spec["method"] == "iterative" and len(spec["iterative"]["imputations"]) == 3
    assert set(report["imputation_between_variance"]) == {"f1"}  # m > 1 posterior draws differ
    new = pd.DataFrame({"f0": [10.0, 14.0], "f1": [np.nan, np.nan], "f2": [0.0, 0.0], "color": ["red", "red"]})
    out = apply_transform(new, load_transform(art), keep_label=False)
    assert np.isfinite(out["f1"]).all()


@pytest.mark.parametrize("rule, min_precision, min_recall",
                         [("prune_by_noise_rate", 0.8, 0.8), ("confident_joint", 0.9, 0.6)])
def test_label_issue_detector_recovers_flips(rule, min_precision, min_recall):
    from sklearn.datasets import load_breast_cancer

    from dsk.clean.table import label_issue_mask

    X, y = load_breast_cancer(return_X_y=True)
    rng = np.random.default_rng(0)
    flip = rng.choice(len(y), size=len(y) // 10, replace=False)
    noisy = y.copy()
    noisy[flip] = 1 - noisy[flip]
    flagged, info = label_issue_mask(X, noisy, folds=5, seed=0, rule=rule)
    truth = np.zeros(len(y), bool)
    truth[flip] = True
    precision = (flagged & truth).sum() / flagged.sum()
    recall = (flagged & truth).sum() / truth.sum()
    assert precision > min_precision and recall > min_recall, (precision, recall)
