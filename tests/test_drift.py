"""`dsk drift`: a true negative and a true positive for tables and for text; exit codes."""

from __future__ import annotations

import json
import random

import numpy as np
import pandas as pd
import pytest

from conftest import SAMPLE


@pytest.fixture
def table_ref(cli, tmp_path):
    code, out, err = cli("clean", SAMPLE / "breast_cancer.csv", "--label", "diagnosis", "--json")
    assert code == 0, err
    df = pd.read_csv(SAMPLE / "breast_cancer.csv")
    same = df.sample(frac=0.5, random_state=1)
    same.to_csv(tmp_path / "same.csv", index=False)
    shifted = same.copy()
    for col in ("mean_radius", "worst_area"):
        shifted[col] = shifted[col] * 1.6 + 2
    shifted.to_csv(tmp_path / "shifted.csv", index=False)
    return json.loads(out)["id"]


def test_table_drift_true_negative_and_positive(cli, table_ref, tmp_path):
    code, out, _ = cli("drift", "--reference", table_ref, "--current", tmp_path / "same.csv",
                       "--out", tmp_path / "a.json", "--json")
    assert code == 0 and json.loads(out)["drifted"] == []
    code, out, _ = cli("drift", "--reference", table_ref, "--current", tmp_path / "shifted.csv",
                       "--out", tmp_path / "b.json", "--json")
    assert code == 1
    result = json.loads((tmp_path / "b.json").read_text())
    assert result["drifted"] == ["mean_radius", "worst_area"]
    psi = {r["feature"]: r["psi"] for r in result["features"]}
    assert psi["mean_radius"] > 0.2 > psi["mean_texture"]


def test_table_drift_missing_column_is_clear(cli, table_ref, tmp_path):
    pd.read_csv(tmp_path / "same.csv").drop(columns=["mean_radius"]).to_csv(tmp_path / "bad.csv", index=False)
    code, _, err = cli("drift", "--reference", table_ref, "--current", tmp_path / "bad.csv", "--out", tmp_path / "c.json")
    assert code == 2 and "mean_radius" in err


def test_text_drift_true_negative_and_positive(cli, tmp_path):
    text = (SAMPLE / "tinyshakespeare.txt").read_text()
    (tmp_path / "ref.txt").write_text(text[:150_000])
    (tmp_path / "heldout.txt").write_text(text[-40_000:])
    rng = random.Random(0)
    words = ["def", "return", "import", "self", "class", "lambda", "yield", "None", "0x1F", "{}", "=>", "!="]
    (tmp_path / "code.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(30)) for _ in range(100)))
    assert cli("clean", tmp_path / "ref.txt", "--min-words", "1", "--quiet")[0] == 0
    code, out, err = cli("featurize", "--vocab-size", "300", "--json")
    assert code == 0, err
    ref = json.loads(out)["id"]
    code, out, _ = cli("drift", "--reference", ref, "--current", tmp_path / "heldout.txt", "--out", tmp_path / "t.json", "--json")
    assert code == 0, out
    code, out, _ = cli("drift", "--reference", ref, "--current", tmp_path / "code.txt", "--out", tmp_path / "u.json", "--json")
    assert code == 1
    result = json.loads(out)
    assert "token_jsd_bits" in result["drifted"] and result["statistics"]["token_jsd_bits"]["value"] > 0.1


def test_psi_is_zero_for_identical_samples():
    from dsk.drift import jensen_shannon, psi

    x = np.random.default_rng(0).normal(size=5000)
    assert psi(x, x) == pytest.approx(0.0, abs=1e-9)
    assert psi(x, x + 3) > 1.0
    p = np.array([0.5, 0.5, 0.0])
    assert jensen_shannon(p + 1e-12, p + 1e-12) == pytest.approx(0.0, abs=1e-9)
    assert jensen_shannon(np.array([1.0, 1e-12]), np.array([1e-12, 1.0])) == pytest.approx(1.0, abs=1e-6)


def test_unknown_reference(cli, tmp_path):
    (tmp_path / "x.csv").write_text("a\n1\n")
    code, _, err = cli("drift", "--reference", "nosuchref", "--current", tmp_path / "x.csv")
    assert code == 2 and "no artifact matches" in err
