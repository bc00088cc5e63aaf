"""Does augmentation help when data is scarce? And is text augmentation fast enough?

Three measurements, side by side with the no-augmentation baseline, in one run:

1. Images: sklearn's digits (8x8), training on only 10% of the training split; the same small
   CNN trained with no augmentation, rotation + noise, MixUp, CutMix and combinations, applied
   on the fly with `dsk.data.augment_ops.compose`. Mean ± std test accuracy over seeds.
2. Time series: one-step-ahead forecasting of yearly sunspot activity (statsmodels' bundled
   `sunspots` data, 1700-2008) from the previous 24 years, training on the first 90 years only;
   the same MLP with each series op. Mean ± std test RMSE over seeds (lower is better).
3. Speed: `dsk augment` on 10,000 documents with all four EDA ops (library call and the whole
   stage including parquet IO).

    $ python benchmarks/augment_gain.py            # ~4 min on a busy 2-core machine
    $ python benchmarks/augment_gain.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dsk.data.augment_ops import compose

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "results"

IMAGE_CONDITIONS = {
    "none": None,
    "rotation+noise": [{"type": "RandomRotation", "params": {"degrees": 15}},
                       {"type": "GaussianNoise", "params": {"sigma": 0.05}}],
    "MixUp": [{"type": "MixUp", "params": {"alpha": 0.4}}],
    "CutMix": [{"type": "CutMix", "params": {"alpha": 1.0}}],
    "rotation+noise+MixUp": [{"type": "RandomRotation", "params": {"degrees": 15}},
                             {"type": "GaussianNoise", "params": {"sigma": 0.05}},
                             {"type": "MixUp", "params": {"alpha": 0.4}}],
    "rotation+noise+CutMix": [{"type": "RandomRotation", "params": {"degrees": 15}},
                              {"type": "GaussianNoise", "params": {"sigma": 0.05}},
                              {"type": "CutMix", "params": {"alpha": 1.0}, "p": 0.5}],
}

SERIES_CONDITIONS = {
    "none": None,
    "Jitter": [{"type": "Jitter", "params": {"sigma": 0.05}}],
    "MagnitudeScaling": [{"type": "MagnitudeScaling", "params": {"sigma": 0.1}}],
    "TimeWarp": [{"type": "TimeWarp", "params": {"sigma": 0.2}}],
    "WindowSlice": [{"type": "WindowSlice", "params": {"ratio": 0.9}}],
    "FrequencyPerturbation": [{"type": "FrequencyPerturbation", "params": {"amplitude": 0.1, "phase": 0.1}}],
    "Jitter+MagnitudeScaling": [{"type": "Jitter", "params": {"sigma": 0.05}},
                                {"type": "MagnitudeScaling", "params": {"sigma": 0.1}}],
}


def mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "runs": values}


# --------------------------------------------------------------------------- images


class SmallCNN(nn.Module):
    def __init__(self, n_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, n_classes)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        return self.fc(x.flatten(1))


@functools.lru_cache(maxsize=1)
def digits_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    return train_test_split(x, d.target, test_size=0.3, random_state=0, stratify=d.target)


def digits_run(ops, seed: int, steps: int, fraction: float) -> float:
    from sklearn.model_selection import train_test_split

    x_train, x_test, y_train, y_test = digits_split()
    # a different scarce subset per seed: 10% of the training split, stratified
    x_small, _, y_small, _ = train_test_split(x_train, y_train, train_size=fraction, random_state=seed, stratify=y_train)
    torch.manual_seed(seed)
    model = SmallCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    xb, yb = torch.from_numpy(x_small), F.one_hot(torch.from_numpy(y_small), 10).float()
    aug = compose(ops, modality="image") if ops else None
    for step in range(steps):
        xs, ys = xb, yb
        if aug is not None:
            out = aug(xb, yb, seed=seed * 100_003 + step)
            xs, ys = out.output, out.labels
        loss = F.cross_entropy(model(xs), ys)  # soft targets: MixUp/CutMix labels work as is
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pred = model(torch.from_numpy(x_test)).argmax(1).numpy()
    return float((pred == y_test).mean())


# --------------------------------------------------------------------------- time series


def sunspot_windows(window: int):
    import statsmodels.api as sm

    series = sm.datasets.sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float32)
    segs = np.stack([series[i : i + window + 1] for i in range(len(series) - window)])
    return series, segs


def sunspots_run(ops, seed: int, steps: int, window: int = 24, train_years: int = 90) -> float:
    series, segs = sunspot_windows(window)
    n_train = train_years - window  # windows whose target year is among the first train_years
    mu, sd = series[:train_years].mean(), series[:train_years].std()
    z = (segs - mu) / sd
    train, test = z[:n_train], z[n_train + window :]  # a gap so no test input overlaps training targets
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(window, 64), nn.ReLU(), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-3)
    aug = compose(ops, modality="series") if ops else None
    for step in range(steps):
        seg = train
        if aug is not None:
            # augment input and target together, as one series, so they stay consistent
            seg = aug(train[:, :, None], seed=seed * 100_003 + step).output[:, :, 0]
        seg = torch.from_numpy(np.ascontiguousarray(seg, dtype=np.float32))
        loss = F.mse_loss(model(seg[:, :-1]).squeeze(1), seg[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        t = torch.from_numpy(test)
        pred = model(t[:, :-1]).squeeze(1).numpy()
    return float(np.sqrt(np.mean((pred - test[:, -1]) ** 2)) * sd)  # RMSE in sunspot units


# --------------------------------------------------------------------------- text speed


def text_speed(n_docs: int) -> dict[str, float]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    paragraphs = [p.strip() for p in (REPO / "data" / "sample" / "tinyshakespeare.txt").read_text().split("\n\n") if p.strip()]
    docs = [paragraphs[i % len(paragraphs)] for i in range(n_docs)]
    ops = [{"type": "EDA", "params": {"synonym_replacement": 0.1, "random_insertion": 0.1,
                                      "random_swap": 0.1, "random_deletion": 0.1}}]
    aug = compose(ops, modality="text")
    started = time.perf_counter()
    for i, d in enumerate(docs):
        aug(d, seed=i)
    lib_s = time.perf_counter() - started

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["DSK_HOME"] = str(Path(tmp) / "home")
        from dsk import console
        from dsk.augment import Params, run
        from dsk.config import StageParams
        from dsk.runtime import run_stage

        console.set_mode(quiet=True)
        rows = [{"doc_id": i, "text": t, "source": "tinyshakespeare.txt", "line": i} for i, t in enumerate(docs)]

        def build(ctx):
            pq.write_table(pa.Table.from_pylist(rows), ctx.out / "documents.parquet")
            ctx.kind = "text"

        clean = run_stage(stage="clean", params=StageParams(), inputs=[], build=build)
        started = time.perf_counter()
        res = run(source=clean.artifact.id, params=Params(ops=ops, copies=1))
        stage_s = time.perf_counter() - started
        console.set_mode()
    words = sum(len(d.split()) for d in docs) / len(docs)
    return {"n_docs": n_docs, "mean_words_per_doc": round(words, 1), "library_s": round(lib_s, 3),
            "stage_s": round(stage_s, 3), "docs_per_s": round(n_docs / lib_s), "n_written": res.artifact.metrics["n_documents"]}


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and fair to other jobs
    seeds = [0, 1] if args.quick else [0, 1, 2, 3, 4]
    img_steps = 60 if args.quick else 200
    ts_steps = 100 if args.quick else 500
    started = time.perf_counter()

    images = {}
    for name, ops in IMAGE_CONDITIONS.items():
        images[name] = mean_std([digits_run(ops, s, img_steps, fraction=0.1) for s in seeds])
        print(f"digits  {name:26} acc {images[name]['mean']:.4f} ± {images[name]['std']:.4f}", flush=True)
    series = {}
    for name, ops in SERIES_CONDITIONS.items():
        series[name] = mean_std([sunspots_run(ops, s, ts_steps) for s in seeds])
        print(f"sunspot {name:26} rmse {series[name]['mean']:.2f} ± {series[name]['std']:.2f}", flush=True)
    speed = text_speed(2000 if args.quick else 10_000)
    print(f"text speed: {speed}", flush=True)

    result = {
        "benchmark": "augment_gain", "quick": args.quick, "seeds": seeds,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus (shared with other jobs when run by a helper)",
        "digits": {"fraction": 0.1, "steps": img_steps, "metric": "test accuracy", "conditions": images},
        "sunspots": {"window": 24, "train_years": 90, "steps": ts_steps, "metric": "test RMSE", "conditions": series},
        "text_speed": speed, "seconds": round(time.perf_counter() - started, 1),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "augment_gain.json").write_text(json.dumps(result, indent=2) + "\n")
    base_acc, base_rmse = images["none"]["mean"], series["none"]["mean"]
    lines = ["# augment_gain", "", f"seeds: {seeds}; quick: {args.quick}", "",
             "| digits (10% of train), small CNN | test accuracy (mean ± std) | vs none |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['mean']:.4f} ± {v['std']:.4f} | {v['mean'] - base_acc:+.4f} |" for k, v in images.items()]
    lines += ["", "| sunspots (first 90 years), MLP | test RMSE (mean ± std, lower is better) | vs none |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v['mean']:.2f} ± {v['std']:.2f} | {v['mean'] - base_rmse:+.2f} |" for k, v in series.items()]
    lines += ["", f"text: {speed['n_docs']} documents (~{speed['mean_words_per_doc']} words) with all four EDA ops: "
              f"library {speed['library_s']} s, whole stage {speed['stage_s']} s", ""]
    (RESULTS / "augment_gain.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
