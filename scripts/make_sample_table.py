"""Write data/sample/breast_cancer.csv: scikit-learn's breast-cancer table with planted mess.

The table is the Wisconsin diagnostic breast-cancer data that ships inside scikit-learn
(569 rows, 30 numeric features, label ``diagnosis``: 0 malignant, 1 benign). To exercise
`dsk clean`, a seeded process injects: 3% missing cells, 10 rows with a 10x outlier in one
column, and 8 exact duplicate rows. Run it again to get the identical file.

    $ python scripts/make_sample_table.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer

SEED = 7
OUT = Path(__file__).resolve().parents[1] / "data" / "sample" / "breast_cancer.csv"


def main() -> None:
    rng = np.random.default_rng(SEED)
    data = load_breast_cancer(as_frame=True)
    df = data.frame.rename(columns={"target": "diagnosis"})
    df.columns = [c.replace(" ", "_") for c in df.columns]
    features = [c for c in df.columns if c != "diagnosis"]
    df[features] = df[features].round(5)
    # outliers: 10 rows, one column each, multiplied by 10
    for row in rng.choice(len(df), size=10, replace=False):
        col = features[rng.integers(len(features))]
        df.loc[row, col] = round(float(df.loc[row, col]) * 10 + 1.0, 5)
    # missing cells: 3% of the feature cells
    mask = rng.random((len(df), len(features))) < 0.03
    values = df[features].to_numpy(dtype=float)
    values[mask] = np.nan
    df[features] = values
    # exact duplicates: 8 rows repeated at the end
    dups = df.iloc[rng.choice(len(df), size=8, replace=False)]
    df = pd.concat([df, dups], ignore_index=True)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(OUT, index=False)
    print(f"wrote {OUT} ({len(df)} rows, {mask.sum()} missing cells)")


if __name__ == "__main__":
    main()
