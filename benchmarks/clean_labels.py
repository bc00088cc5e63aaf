"""Label-issue detection: flip 10% of the labels of real scikit-learn tables, score the flags.

For each dataset and seed, 10% of rows get a different class at random; `dsk clean`'s
confident-learning detector (5-fold out-of-fold probabilities) flags rows, and we report
precision and recall of the flags against the flipped rows, for both rules and for the naive
baseline "out-of-fold argmax disagrees with the given label".

    $ python benchmarks/clean_labels.py
    $ python benchmarks/clean_labels.py --quick     # one seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from dsk.clean.table import label_issue_mask  # noqa: E402

HERE = Path(__file__).resolve().parent


def naive_disagreement(X: np.ndarray, y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=3000))
    pred = cross_val_predict(model, X, y, cv=StratifiedKFold(folds, shuffle=True, random_state=seed))
    return pred != y


def main() -> int:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    seeds = [0] if args.quick else [0, 1, 2, 3, 4]
    rows = []
    for name, loader in [("breast_cancer", load_breast_cancer), ("wine", load_wine), ("digits", load_digits)]:
        X, y = loader(return_X_y=True)
        n_classes = len(np.unique(y))
        scores: dict[str, list[tuple[float, float]]] = {}
        started = time.perf_counter()
        for seed in seeds:
            rng = np.random.default_rng(seed)
            flip = rng.choice(len(y), size=len(y) // 10, replace=False)
            noisy = y.copy()
            noisy[flip] = (noisy[flip] + rng.integers(1, n_classes, size=len(flip))) % n_classes
            truth = np.zeros(len(y), bool)
            truth[flip] = True
            flags = {
                "prune_by_noise_rate": label_issue_mask(X, noisy, 5, seed, "prune_by_noise_rate")[0],
                "confident_joint": label_issue_mask(X, noisy, 5, seed, "confident_joint")[0],
                "baseline: OOF argmax != label": naive_disagreement(X, noisy, 5, seed),
            }
            for rule, f in flags.items():
                p = (f & truth).sum() / max(f.sum(), 1)
                r = (f & truth).sum() / truth.sum()
                scores.setdefault(rule, []).append((float(p), float(r)))
        for rule, s in scores.items():
            arr = np.array(s)
            rows.append({"dataset": f"{name} ({len(y)} rows, {n_classes} classes)", "rule": rule,
                         "precision": round(float(arr[:, 0].mean()), 3), "recall": round(float(arr[:, 1].mean()), 3),
                         "seeds": len(seeds)})
            print(rows[-1], flush=True)
        print(f"{name}: {time.perf_counter() - started:.1f}s", flush=True)
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "clean_labels.json").write_text(json.dumps({"flip_rate": 0.1, "rows": rows}, indent=2))
    md = ["clean_labels: 10% of labels flipped at random; mean over seeds", "",
          "| dataset | rule | precision | recall |", "|---|---|---|---|"]
    md += [f"| {r['dataset']} | {r['rule']} | {r['precision']} | {r['recall']} |" for r in rows]
    (HERE / "results" / "clean_labels.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
