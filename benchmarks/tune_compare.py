"""`dsk tune`: the best of N TPE trials versus the best of N random trials, same budget.

Both studies search the same five pretraining params of the `tiny-dense` preset on the sample
corpus (BPE 512), with the same number of trials, the same fixed training length per trial and
pruning off, so each spends the same compute. Reported: the best validation bits per byte of
each, and the best-so-far curve trial by trial.

    $ python benchmarks/tune_compare.py              # 20 trials each (~10 min on 2 cores)
    $ python benchmarks/tune_compare.py --trials 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

SPACE = ["lr=loguniform:1e-4:3e-2", "warmup_steps=int:0:40", "weight_decay=uniform:0:0.2",
         "beta2=uniform:0.9:0.999", "min_lr_ratio=uniform:0:0.5"]
FIXED = ["preset=tiny-dense", "context=64", "batch_size=16", "max_steps=80", "eval_every=0",
         "eval_tokens=8192", "log_every=20", "threads=1", "checkpoint_every_minutes=0"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from dsk import console
    from dsk.artifacts import Store
    from dsk.clean import Params as CleanParams
    from dsk.clean import run as clean
    from dsk.featurize import Params as FeaturizeParams
    from dsk.featurize import run as featurize
    from dsk.tune import run_tune

    console.set_mode(quiet=True)
    with tempfile.TemporaryDirectory() as tmp:
        store = Store.open(Path(tmp) / "dsk")
        clean(source=str(REPO / "data" / "sample" / "tinyshakespeare.txt"),
              params=CleanParams(min_words=1, min_mean_word_length=1.0), store=store)
        tokens = featurize(params=FeaturizeParams(vocab_size=512, val_fraction=0.1), store=store).artifact
        results = {}
        for sampler in ("tpe", "random"):
            started = time.perf_counter()
            study = run_tune(stage="pretrain", space=SPACE, trials=args.trials, metric="val_bpb", sampler=sampler,
                             source=str(tokens.path), overrides=FIXED, seed=args.seed, prune=False, store=store)
            values = [t["value"] for t in sorted(study["trials"], key=lambda t: t["number"]) if t["value"] is not None]
            best_so_far = [min(values[: i + 1]) for i in range(len(values))]
            results[sampler] = {"best_val_bpb": study["best"]["value"], "best_params": study["best"]["params"],
                                "best_so_far": best_so_far, "seconds": round(time.perf_counter() - started, 1)}
            print(f"{sampler}: best val_bpb {study['best']['value']:.4f} after {len(values)} trials "
                  f"({results[sampler]['seconds']:.0f} s)", flush=True)
    out = {"benchmark": "tune_compare", "trials": args.trials, "space": SPACE, "fixed": FIXED, "results": results,
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs", "date": time.strftime("%Y-%m-%d")}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tune_compare.json").write_text(json.dumps(out, indent=2) + "\n")
    checkpoints = [i for i in (1, 5, 10, 15, 20, args.trials) if i <= args.trials]
    lines = ["# tune_compare: best of N TPE trials vs best of N random trials", "",
             f"pretrain `tiny-dense`, 80 steps per trial, 5 params, {args.trials} trials each, pruning off; "
             f"{out['machine']}, {out['date']}", "",
             "| sampler | " + " | ".join(f"best after {i}" for i in sorted(set(checkpoints))) + " | seconds |",
             "|---|" + "---:|" * (len(set(checkpoints)) + 1)]
    for sampler, r in results.items():
        cells = [f"{r['best_so_far'][i - 1]:.4f}" for i in sorted(set(checkpoints)) if i <= len(r["best_so_far"])]
        lines.append(f"| {sampler} | " + " | ".join(cells) + f" | {r['seconds']:.0f} |")
    (HERE / "results" / "tune_compare.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
