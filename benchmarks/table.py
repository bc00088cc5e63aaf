"""dsk's table pipeline vs HistGradientBoosting vs logistic regression, 5-fold CV, with/without featurize.

For every table and fold, the training fold is written to CSV and run through the real stages
in a scratch store: `dsk clean` (label given; outliers clipped, not dropped, and label issues
off so that every model sees every training row), optionally `dsk featurize`, then
`dsk pretrain` (the MoE table classifier with its shipped default settings). The held-out fold is scored from its *raw* rows
through the model artifact's saved transforms (dsk.tabular.predict), exactly as the server
would. The baselines train on the same cleaned rows (and, in the featurize arm, the same
engineered features), and score the held-out fold after the same saved transforms:
scikit-learn's HistGradientBoostingClassifier with default settings and LogisticRegression.

Tables (all shipped offline): scikit-learn's breast cancer (569 x 30, binary), wine
(178 x 13, 3 classes), digits (1797 x 64, 10 classes), and a make_classification table
(3000 x 20, binary, 10 informative). ROC-AUC is binary, or macro one-vs-rest for more classes.

    $ python benchmarks/table.py                 # everything (tens of minutes on 2 cores)
    $ python benchmarks/table.py --quick         # 3 folds, breast cancer + wine, fewer epochs
    $ python benchmarks/table.py --tables wine digits --no-featurize
    $ python benchmarks/table.py --tables digits --fold-ids 0 --name part   # one fold (parallel runs)
    $ python benchmarks/table.py --merge results/part*.json --name table   # join the parts

Writes benchmarks/results/table.json and benchmarks/results/table.md (and docs/tables.md
embeds the same table). Timings are wall-clock fit times on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
warnings.filterwarnings("ignore")
os.environ.setdefault("OMP_NUM_THREADS", "2")

TABLES = ("wine", "breast_cancer", "make_classification", "digits")
CLEAN = {"outlier_action": "clip", "label_issues": "off", "impute": "median"}
FEATURIZE = {"n_estimators": 50, "umap_components": 2, "umap_epochs": 100, "cv_folds": 3, "val_fraction": 0.1}
# the classifier's shipped defaults (dsk.tabular.params.TableParams); one thread per fit
MODEL = {"threads": 1}
QUICK_MODEL = {**MODEL, "epochs": 40, "min_epochs": 10, "patience": 10}


def load(name: str) -> tuple[pd.DataFrame, str]:
    from sklearn import datasets

    if name == "make_classification":
        X, y = datasets.make_classification(n_samples=3000, n_features=20, n_informative=10, n_redundant=4,
                                            n_clusters_per_class=2, flip_y=0.02, class_sep=1.0, random_state=0)
        df = pd.DataFrame(X, columns=[f"x{i}" for i in range(X.shape[1])])
    else:
        bunch = getattr(datasets, f"load_{name}")(as_frame=True)
        df = bunch.frame.drop(columns=["target"])
        df.columns = [str(c).replace(" ", "_").replace("/", "_") for c in df.columns]
        y = bunch.target.to_numpy()
    df["label"] = y
    return df, "label"


def auc(y: np.ndarray, proba: np.ndarray) -> float:
    from dsk.tabular.train import roc_auc

    return roc_auc(y, proba)


def run_fold(name: str, df: pd.DataFrame, label: str, train_idx, test_idx, *, fold: int, workdir: Path,
             featurize: bool, model_params: dict, arms_wanted: tuple[str, ...] = ("raw", "featurize")) -> list[dict]:
    import dsk.clean as clean
    import dsk.featurize as fz
    import dsk.pretrain as pretrain
    from dsk.artifacts import Store
    from dsk.data.table_features import apply_transform as apply_features, load_transform as load_features
    from dsk.data.table_transform import apply_transform, load_transform
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.linear_model import LogisticRegression
    from dsk.tabular.predict import TablePredictor

    store = Store.open(workdir / f"{name}-{fold}")
    csv = workdir / f"{name}-{fold}.csv"
    df.iloc[train_idx].to_csv(csv, index=False)
    test = df.iloc[test_idx].reset_index(drop=True)
    classes = sorted(df[label].unique())
    y_test = test[label].map({c: i for i, c in enumerate(classes)}).to_numpy()
    raw_test = test.drop(columns=[label])

    c = clean.run(source=str(csv), params=clean.Params(label=label, **CLEAN), store=store)
    transform = load_transform(c.artifact.path)
    train_clean = pd.read_parquet(c.artifact.path / "data.parquet")
    test_clean = apply_transform(raw_test, transform, keep_label=False)
    arms = [("raw", c.artifact, train_clean, test_clean, 0.0)]
    if featurize:
        t0 = time.perf_counter()
        f = fz.run(source=c.artifact.id, params=fz.Params(**FEATURIZE), store=store)
        fz_seconds = time.perf_counter() - t0
        ft = load_features(f.artifact.path)
        train_feat = pd.concat([pd.read_parquet(f.artifact.path / p) for p in ("train.parquet", "val.parquet")],
                               ignore_index=True)
        arms.append(("featurize", f.artifact, train_feat, apply_features(ft, test_clean), fz_seconds))

    rows = []
    for arm, art, train_df, test_X, prep_seconds in arms:
        if arm not in arms_wanted:
            continue
        y_train = train_df[label].map({c: i for i, c in enumerate(classes)}).to_numpy()
        X_train = train_df.drop(columns=[label]).to_numpy(dtype=float)
        X_test = test_X[[c for c in train_df.columns if c != label]].to_numpy(dtype=float)
        base = {"table": name, "fold": fold, "features": arm, "n_features": X_train.shape[1],
                "prep_seconds": round(prep_seconds, 2)}

        t0 = time.perf_counter()
        p = pretrain.run(source=art.id, params=pretrain.Params(table=model_params), store=store)
        seconds = time.perf_counter() - t0
        proba = TablePredictor.load(p.artifact.path).predict_frame(raw_test)  # raw rows, saved transforms
        rows.append({**base, "model": "dsk", "auc": auc(y_test, proba), "accuracy": float((proba.argmax(1) == y_test).mean()),
                     "seconds": round(seconds, 2), "epochs": p.artifact.metrics["epochs"],
                     "best_epoch": p.artifact.metrics["best_epoch"]})

        for model_name, make in (("hist_gbm", lambda: HistGradientBoostingClassifier(random_state=0)),
                                 ("logreg", lambda: LogisticRegression(max_iter=5000))):
            m = make()
            t0 = time.perf_counter()
            m.fit(X_train, y_train)
            seconds = time.perf_counter() - t0
            proba = m.predict_proba(X_test)
            rows.append({**base, "model": model_name, "auc": auc(y_test, proba),
                         "accuracy": float((proba.argmax(1) == y_test).mean()), "seconds": round(seconds, 3)})
        for r in rows[-3:]:
            print(f"  {name} fold {fold} {arm:9s} {r['model']:8s} AUC {r['auc']:.4f} acc {r['accuracy']:.4f} "
                  f"{r['seconds']:.1f}s", flush=True)
    return rows


def summarize(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    g = df.groupby(["table", "features", "model"], sort=False)
    out = g.agg(auc_mean=("auc", "mean"), auc_std=("auc", "std"), acc_mean=("accuracy", "mean"),
                acc_std=("accuracy", "std"), seconds=("seconds", "mean"), folds=("fold", "count")).reset_index()
    return out


def markdown(summary: pd.DataFrame, meta: dict) -> str:
    lines = [f"{meta['folds']}-fold CV (column `folds`: how many of them ran), {meta['machine']}; "
             f"fit seconds are per fold, wall clock.", "",
             "| table | features | model | ROC-AUC | accuracy | fit s/fold | folds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in summary.itertuples():
        lines.append(f"| {r.table} | {r.features} | {r.model} | {r.auc_mean:.4f} ± {r.auc_std:.4f} | "
                     f"{r.acc_mean:.4f} ± {r.acc_std:.4f} | {r.seconds:.2f} | {r.folds} |")
    lines += ["", "| table | features | dsk AUC − GBM AUC | within 0.005 or better? |", "| --- | --- | --- | --- |"]
    for (table, arm), grp in summary.groupby(["table", "features"], sort=False):
        by = grp.set_index("model")["auc_mean"]
        if "dsk" in by and "hist_gbm" in by:
            gap = by["dsk"] - by["hist_gbm"]
            lines.append(f"| {table} | {arm} | {gap:+.4f} | {'yes' if gap >= -0.005 else 'no'} |")
    if (summary["features"] == "featurize").any():
        lines += ["", "| table | model | AUC raw | AUC featurize | change |", "| --- | --- | --- | --- | --- |"]
        for (table, model), grp in summary.groupby(["table", "model"], sort=False):
            by = grp.set_index("features")["auc_mean"]
            if "raw" in by and "featurize" in by:
                lines.append(f"| {table} | {model} | {by['raw']:.4f} | {by['featurize']:.4f} | "
                             f"{by['featurize'] - by['raw']:+.4f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 folds, breast cancer + wine, fewer epochs")
    ap.add_argument("--tables", nargs="*", default=None, choices=TABLES)
    ap.add_argument("--folds", type=int, default=None)
    ap.add_argument("--fold-ids", type=int, nargs="*", default=None, help="run only these folds (to split a run across processes; --merge joins them)")
    ap.add_argument("--no-featurize", action="store_true", help="only the raw-features arm")
    ap.add_argument("--only-featurize", action="store_true", help="only the featurize arm")
    ap.add_argument("--name", default="table", help="results file stem (results/NAME.json/.md)")
    ap.add_argument("--merge", nargs="*", default=None, help="merge these results .json files into results/NAME.*")
    ap.add_argument("--out", default=str(HERE / "results"))
    args = ap.parse_args(argv)
    from sklearn.model_selection import StratifiedKFold

    from dsk import console

    console.set_mode(quiet=True)
    out = Path(args.out)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for p in parts for r in p["rows"]]
        meta = {**parts[0]["meta"], "merged": [p["meta"] for p in parts]}
        meta["featurize"] = next((p["meta"]["featurize"] for p in parts if p["meta"].get("featurize")), None)
        summary = summarize(rows)
        (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                          "summary": summary.to_dict("records")}, indent=1))
        (out / f"{args.name}.md").write_text(markdown(summary, meta))
        print((out / f"{args.name}.md").read_text())
        return 0
    tables = args.tables or (["wine", "breast_cancer"] if args.quick else list(TABLES))
    folds = args.folds or (3 if args.quick else 5)
    model_params = QUICK_MODEL if args.quick else MODEL
    out.mkdir(parents=True, exist_ok=True)
    arms = ("raw",) if args.no_featurize else ("featurize",) if args.only_featurize else ("raw", "featurize")
    meta = {"folds": folds, "tables": tables, "clean": CLEAN, "featurize": None if args.no_featurize else FEATURIZE,
            "model": model_params, "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
            "python": platform.python_version()}
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="dsk-bench-table-") as tmp:
        for name in tables:
            df, label = load(name)
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
            for fold, (tr, te) in enumerate(skf.split(df, df[label])):
                if args.fold_ids is not None and fold not in args.fold_ids:
                    continue
                rows += run_fold(name, df, label, tr, te, fold=fold, workdir=Path(tmp),
                                 featurize="featurize" in arms, model_params=model_params, arms_wanted=arms)
                # partial results survive an interrupted run
                summary = summarize(rows)
                meta["seconds"] = round(time.perf_counter() - started, 1)
                (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "rows": rows,
                                                            "summary": summary.to_dict("records")}, indent=1))
                (out / f"{args.name}.md").write_text(markdown(summary, meta))
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
