"""Benchmark `dsk finetune` on the sample tasks: base vs LoRA vs full SFT, and DPO before/after.

One run, same data and steps for both SFT methods, on two bases side by side:

1. two base models, `dsk featurize` + `dsk pretrain` on data/sample/tinyshakespeare.txt:
   ``plain`` (corpus windows) and ``repeat`` (`--repeat-fraction`: a share of the rows carry a
   repeated span, pressure towards in-context copying); for each, validation bits per byte
   and a copy test (loss on a span, then on its exact repeat);
2. held-out exact match (greedy) on data/sample/tasks/heldout.jsonl of each base, of LoRA
   finetuning and of full finetuning on data/sample/tasks/train.jsonl, per task, plus the
   trainable fraction;
3. DPO on data/sample/tasks/preferences.jsonl starting from (and anchored to) the LoRA SFT
   model of the last base: held-out preference accuracy (log p(chosen) > log p(rejected)) on
   data/sample/tasks/preferences_heldout.jsonl before and after.

Targets (issue 8): LoRA >= 90% of full finetuning's accuracy with <= 2% of the parameters
trainable; SFT well above the base. The learning rates and LoRA shape are the best of
benchmarks/finetune_sweep.py (docs/finetune.md).

    $ python benchmarks/finetune.py            # ~35 min on a shared 2-core CPU (two 6000-step bases: ~10 min each,
                                               # four 1200-step SFT runs: ~2 min each)
    $ python benchmarks/finetune.py --quick    # a smoke run (numbers not meaningful)

Writes benchmarks/results/finetune.json and benchmarks/results/finetune.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
TASKS = ROOT / "data" / "sample" / "tasks"
CORPUS = ROOT / "data" / "sample" / "tinyshakespeare.txt"
RESULTS = Path(__file__).resolve().parent / "results"


def text_artifact(store):
    """A clean-layout text artifact of the sample corpus (paragraphs as documents)."""
    import pandas as pd

    from dsk.artifacts import hash_raw_input
    from dsk.config import StageParams
    from dsk.runtime import run_stage

    docs = [d.strip() for d in CORPUS.read_text(encoding="utf-8").split("\n\n") if d.strip()]

    def build(ctx):
        pd.DataFrame({"doc_id": range(len(docs)), "text": docs, "source": CORPUS.name,
                      "line": range(len(docs))}).to_parquet(ctx.out / "documents.parquet", index=False)
        ctx.kind = "text"

    return run_stage(stage="clean", params=StageParams(), inputs=[hash_raw_input(CORPUS)], build=build,
                     store=store, kind="text").artifact


def task_of(prompt: str) -> str:
    return prompt.split(":")[0]


def score_heldout(path, heldout) -> dict:
    """Greedy exact match of the model at ``path`` on the held-out tasks, overall and per task."""
    from dsk.data.tokenizer import load_tokenizer
    from dsk.evaluation.tasks import exact_match, is_exact
    from dsk.models import load_model

    model, _, _ = load_model(path)
    tok = load_tokenizer(path)
    score, preds = exact_match(model, tok, heldout, max_new_tokens=24)
    per_task: dict[str, list[int]] = defaultdict(list)
    for p, r in zip(preds, heldout):
        per_task[task_of(r.prompt_messages[-1]["content"])].append(int(is_exact(p, r.answer)))
    return {"exact_match": score,
            "per_task": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_task.items())},
            "examples": [{"prompt": r.prompt_messages[-1]["content"], "answer": r.answer, "predicted": p}
                         for p, r in list(zip(preds, heldout))[:6]]}


def tokens_artifact(store):
    """The sample corpus featurized (byte-level BPE, 1024 tokens, 5% validation)."""
    from dsk import featurize

    return featurize.run(source=text_artifact(store).id, params=featurize.Params(vocab_size=1024, val_fraction=0.05),
                         store=store).artifact


def val_tokens(store):
    """The validation token ids of the sample corpus (for the copy test)."""
    import numpy as np

    path = tokens_artifact(store).path
    return np.fromfile(path / "val.bin", dtype=json.loads((path / "meta.json").read_text())["dtype"])


def copy_test(path, val_tokens, *, seed: int = 0) -> dict:
    """In-context copying of a model: mean loss on a 30-token span, then on its exact repeat.

    Two kinds of span: validation text and uniformly random tokens. A model that copies from
    its context predicts the repeat far better than the first pass; one that does not
    (repeat ~ first) cannot lift a word out of a prompt, which copy / first word / last word /
    reverse need.
    """
    import numpy as np
    import torch
    import torch.nn.functional as F

    from dsk.models import load_model

    model, _, cfg = load_model(path)
    model.eval()
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(val_tokens) - 30, 32)
    spans = {"corpus": torch.from_numpy(np.stack([np.asarray(val_tokens[s : s + 30], dtype=np.int64) for s in starts])),
             "random": torch.from_numpy(rng.integers(10, cfg.vocab_size - 24, (32, 30)))}
    out = {}
    for name, x in spans.items():
        seq = torch.cat([x, x], 1)
        with torch.no_grad():
            logits = model(seq).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), seq[:, 1:].reshape(-1),
                               reduction="none").view(len(x), -1)
        out[name] = {"first": round(float(loss[:, :29].mean()), 3), "repeat": round(float(loss[:, 30:].mean()), 3)}
    return out


def build_base(store, *, preset: str, pretrain_steps: int, threads: int, repeat_fraction: float = 0.0,
               lr: float = 3e-3):
    """The base model: featurize + pretrain on the sample corpus (a cache hit when built before).

    ``repeat_fraction`` > 0 gives that share of pretraining rows a repeated span
    (`dsk pretrain --repeat-fraction`), which teaches the base in-context copying.
    """
    from dsk import pretrain

    tokens = tokens_artifact(store)
    return pretrain.run(source=tokens.id, params=pretrain.Params(
        preset=preset, context=128, batch_size=8, max_steps=pretrain_steps, lr=lr, warmup_steps=20,
        eval_every=0, eval_tokens=16384, threads=threads, checkpoint_every_minutes=0,
        repeat_fraction=repeat_fraction), store=store).artifact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--pretrain-steps", type=int, default=6000)
    ap.add_argument("--pretrain-lr", type=float, default=1e-3)
    ap.add_argument("--repeat-fraction", type=float, default=0.5, help="the repeat base's pretrain --repeat-fraction")
    ap.add_argument("--bases", default="plain,repeat", help="which bases to compare (plain, repeat)")
    ap.add_argument("--sft-steps", type=int, default=1200)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-targets", default="attn")
    ap.add_argument("--lora-lr", type=float, default=1e-2)
    ap.add_argument("--full-lr", type=float, default=1e-3)
    ap.add_argument("--dpo-lr", type=float, default=5e-4)
    ap.add_argument("--dpo-beta", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--workspace", default=None, help="DSK_HOME to use (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.pretrain_steps, args.sft_steps, args.dpo_steps = 20, 20, 10

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="dsk-bench-finetune-"))
    os.environ["DSK_HOME"] = str(workspace)
    os.chdir(ROOT)  # data paths are given relative to the repo, as in pipelines/default.yaml

    import torch

    from dsk import finetune
    from dsk.artifacts import Store
    from dsk.data.tokenizer import load_tokenizer
    from dsk.finetune import data as fdata
    from dsk.evaluation.tasks import preference_accuracy
    from dsk.models import load_model

    torch.set_num_threads(args.threads)
    store = Store.open()
    timings: dict[str, float] = {}

    def timed(name, fn):
        t = time.perf_counter()
        out = fn()
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"[{name}] {timings[name]:.0f}s", flush=True)
        return out

    heldout, _ = fdata.read_jsonl(TASKS / "heldout.jsonl", kind="instruction", bad_lines="fail")
    common = dict(data=str((TASKS / "train.jsonl").relative_to(ROOT)), max_steps=args.sft_steps, batch_size=8,
                  context=128, eval_examples=0, threads=args.threads, warmup_steps=20, checkpoint_every_minutes=0)
    arms = {"lora": dict(method="lora", lr=args.lora_lr, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                         lora_targets=args.lora_targets.split(",")),
            "full": dict(method="full", lr=args.full_lr)}
    results: dict = {}
    sft: dict = {}
    for kind in args.bases.split(","):
        rf = {"plain": 0.0, "repeat": args.repeat_fraction}[kind]
        base = timed(f"pretrain_{kind}", lambda: build_base(store, preset=args.preset, pretrain_steps=args.pretrain_steps,
                                                             threads=args.threads, repeat_fraction=rf, lr=args.pretrain_lr))
        val = val_tokens(store)
        res = {"base_id": base.id, "repeat_fraction": rf, "val_bpb": base.metrics["val_bpb"],
               "val_loss": base.metrics["val_loss"], "pretrain_seconds": base.metrics["train_seconds"],
               "copy_test": copy_test(base.path, val)}
        res["base"] = {**score_heldout(base.path, heldout), "trainable_fraction": 0.0}
        print(kind, "base", res["copy_test"], res["base"]["exact_match"], flush=True)
        for arm, extra in arms.items():
            art = timed(f"sft_{arm}_{kind}", lambda: finetune.run(source=base.id, params=finetune.Params(**common, **extra),
                                                                    store=store)).artifact
            sft[kind, arm] = art
            res[arm] = {**score_heldout(art.path, heldout), "trainable_fraction": art.metrics["trainable_fraction"],
                        "trainable_params": art.metrics["trainable_params"], "val_loss": art.metrics["val_loss"],
                        "lr": extra["lr"], "train_seconds": art.metrics["train_seconds"]}
            print(kind, arm, res[arm]["exact_match"], res[arm]["per_task"], flush=True)
        res["lora_over_full"] = res["lora"]["exact_match"] / res["full"]["exact_match"] if res["full"]["exact_match"] else None
        results[kind] = res

    # ---- DPO from the LoRA SFT model of the last base (unmerged LoRA: load_model folds its adapters in)
    kind = args.bases.split(",")[-1]
    sft_art = sft[kind, "lora"]
    tok = load_tokenizer(sft_art.path)
    pref_records, _ = fdata.read_jsonl(TASKS / "preferences_heldout.jsonl", kind="preference", bad_lines="fail")
    pref_pairs = fdata.encode_preferences(pref_records, tok, context=128, path=TASKS, bad_lines="fail", rejects=[])
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    acc_before = preference_accuracy(load_model(sft_art.path)[0], pref_pairs, pad_id=pad)
    dpo_art = timed("dpo", lambda: finetune.run(source=sft_art.id, params=finetune.Params(
        method="dpo", data=str((TASKS / "preferences.jsonl").relative_to(ROOT)), max_steps=args.dpo_steps,
        batch_size=8, beta=args.dpo_beta, lr=args.dpo_lr, lora_rank=4, lora_alpha=8.0, eval_examples=0,
        threads=args.threads, warmup_steps=10, checkpoint_every_minutes=0), store=store)).artifact
    acc_after = preference_accuracy(load_model(dpo_art.path)[0], pref_pairs, pad_id=pad)
    dpo = {"base": kind, "from": "lora", "heldout_pref_acc_before": acc_before, "heldout_pref_acc_after": acc_after,
           "steps": args.dpo_steps, "beta": args.dpo_beta, "lr": args.dpo_lr,
           "train_reward_margin": dpo_art.metrics.get("reward_margin"), "train_reward_acc": dpo_art.metrics.get("reward_acc"),
           "trainable_fraction": dpo_art.metrics["trainable_fraction"],
           "sft_exact_match_before_dpo": results[kind]["lora"]["exact_match"],
           "sft_exact_match_after_dpo": score_heldout(dpo_art.path, heldout)["exact_match"]}
    print("dpo", dpo, flush=True)

    main_res = results[kind]
    ratio = main_res["lora_over_full"]
    summary = {
        "benchmark": "finetune", "quick": args.quick,
        "settings": {"preset": args.preset, "pretrain_steps": args.pretrain_steps, "pretrain_lr": args.pretrain_lr,
                     "repeat_fraction": args.repeat_fraction, "sft_steps": args.sft_steps, "dpo_steps": args.dpo_steps,
                     "lora_rank": args.lora_rank, "lora_targets": args.lora_targets, "lora_lr": args.lora_lr,
                     "full_lr": args.full_lr, "batch_size": 8, "context": 128, "threads": args.threads,
                     "heldout_examples": len(heldout), "heldout_pairs": len(pref_pairs)},
        "bases": results,
        "dpo": dpo,
        "lora_over_full": ratio,
        "targets": {"base": kind,
                    "lora_ge_90pct_of_full": ratio is not None and ratio >= 0.9,
                    "lora_trainable_le_2pct": main_res["lora"]["trainable_fraction"] <= 0.02,
                    "sft_well_above_base": main_res["lora"]["exact_match"] >= main_res["base"]["exact_match"] + 0.2},
        "seconds": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    tasks = list(main_res["full"]["per_task"])
    lines = [
        f"# finetune (sample tasks, {len(heldout)} held-out examples; {args.preset} base, {args.pretrain_steps} pretrain "
        f"steps at lr {args.pretrain_lr:g}, {args.sft_steps} SFT steps; LoRA r{args.lora_rank} on {args.lora_targets} "
        f"lr {args.lora_lr:g}, full lr {args.full_lr:g})", "",
        "| base | val bits/byte | copy test corpus (first / repeat) | copy test random (first / repeat) |",
        "| --- | --- | --- | --- |",
    ]
    for k, res in results.items():
        c = res["copy_test"]
        lines.append(f"| {k} (repeat_fraction {res['repeat_fraction']:g}) | {res['val_bpb']:.3f} | "
                     f"{c['corpus']['first']:.2f} / {c['corpus']['repeat']:.2f} | {c['random']['first']:.2f} / {c['random']['repeat']:.2f} |")
    lines += ["", "| base | model | held-out exact match | trainable | " + " | ".join(tasks) + " |",
              "| --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |"]
    for k, res in results.items():
        for name in ("base", "lora", "full"):
            lines.append(f"| {k} | {name} | {res[name]['exact_match']:.3f} | {100 * res[name]['trainable_fraction']:.2f}% | "
                         + " | ".join(f"{res[name]['per_task'].get(t, 0):.2f}" for t in tasks) + " |")
    lines.append("")
    for k, res in results.items():
        r = res["lora_over_full"]
        lines.append(f"LoRA / full on the {k} base = {r:.3f}" if r is not None else f"LoRA / full on the {k} base = n/a")
        lines.append("")
    lines += [
        f"DPO (from the LoRA SFT model on the {kind} base, {args.dpo_steps} steps, beta {args.dpo_beta:g}, lr {args.dpo_lr:g}): "
        f"held-out preference accuracy {acc_before:.3f} -> {acc_after:.3f} ({len(pref_pairs)} pairs); final train reward "
        f"margin {dpo['train_reward_margin']}, reward accuracy {dpo['train_reward_acc']}; exact match "
        f"{dpo['sft_exact_match_before_dpo']:.3f} -> {dpo['sft_exact_match_after_dpo']:.3f}",
        "",
        f"Seconds: {timings}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (shared machine).",
    ]
    (RESULTS / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
