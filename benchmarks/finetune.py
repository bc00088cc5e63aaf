"""Benchmark `dsk finetune` on the sample tasks: base vs LoRA vs full SFT, and DPO before/after.

One run, same data and steps for both SFT methods:

1. a base model: `dsk featurize` + `dsk pretrain` on data/sample/tinyshakespeare.txt;
2. held-out exact match (greedy) on data/sample/tasks/heldout.jsonl of the base, of LoRA
   finetuning and of full finetuning on data/sample/tasks/train.jsonl, plus the trainable
   fraction of each;
3. DPO on data/sample/tasks/preferences.jsonl starting from (and anchored to) the LoRA SFT
   model: held-out preference accuracy (log p(chosen) > log p(rejected)) on
   data/sample/tasks/preferences_heldout.jsonl before and after.

Targets (issue 8): LoRA >= 90% of full finetuning's accuracy with <= 2% of the parameters
trainable; SFT well above the base.

    $ python benchmarks/finetune.py            # ~15 min on a busy 2-core CPU
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
    from dsk.finetune.scoring import generate_answers
    from dsk.models import load_model

    model, _, _ = load_model(path)
    tok = load_tokenizer(path)
    preds = generate_answers(model, tok, [r.prompt_messages for r in heldout], max_new_tokens=24)
    per_task: dict[str, list[int]] = defaultdict(list)
    for p, r in zip(preds, heldout):
        per_task[task_of(r.prompt_messages[-1]["content"])].append(int(p.strip() == r.answer.strip()))
    hits = [h for v in per_task.values() for h in v]
    return {"exact_match": sum(hits) / len(hits),
            "per_task": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_task.items())},
            "examples": [{"prompt": r.prompt_messages[-1]["content"], "answer": r.answer, "predicted": p}
                         for p, r in list(zip(preds, heldout))[:6]]}


def build_base(store, *, preset: str, pretrain_steps: int, threads: int, repeat_fraction: float = 0.0,
               lr: float = 3e-3):
    """The base model: featurize + pretrain on the sample corpus (a cache hit when built before).

    ``repeat_fraction`` > 0 gives that share of pretraining rows a repeated span
    (`dsk pretrain --repeat-fraction`), which teaches the base in-context copying.
    """
    from dsk import featurize, pretrain

    text = text_artifact(store)
    tokens = featurize.run(source=text.id, params=featurize.Params(vocab_size=1024, val_fraction=0.05), store=store).artifact
    return pretrain.run(source=tokens.id, params=pretrain.Params(
        preset=preset, context=128, batch_size=8, max_steps=pretrain_steps, lr=lr, warmup_steps=20,
        eval_every=0, eval_tokens=16384, threads=threads, checkpoint_every_minutes=0,
        repeat_fraction=repeat_fraction), store=store).artifact


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--dpo-steps", type=int, default=100)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--lora-rank", type=int, default=4)
    ap.add_argument("--lora-targets", default="attn")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    ap.add_argument("--workspace", default=None, help="DSK_HOME to use (default: a temp dir)")
    args = ap.parse_args()
    if args.quick:
        args.pretrain_steps, args.sft_steps, args.dpo_steps = 20, 20, 10

    workspace = Path(args.workspace or tempfile.mkdtemp(prefix="dsk-bench-finetune-"))
    os.environ["DSK_HOME"] = str(workspace)
    os.chdir(ROOT)  # data paths are given relative to the repo, as in pipelines/default.yaml

    import torch

    from dsk import featurize, finetune, pretrain
    from dsk.artifacts import Store
    from dsk.data.tokenizer import load_tokenizer
    from dsk.finetune import data as fdata
    from dsk.finetune.scoring import generate_answers, preference_accuracy
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

    text = text_artifact(store)
    tokens = timed("featurize", lambda: featurize.run(source=text.id, params=featurize.Params(vocab_size=1024, val_fraction=0.05), store=store)).artifact
    base = timed("pretrain", lambda: pretrain.run(source=tokens.id, params=pretrain.Params(
        preset=args.preset, context=128, batch_size=8, max_steps=args.pretrain_steps, lr=3e-3, warmup_steps=20,
        eval_every=0, eval_tokens=16384, threads=args.threads, checkpoint_every_minutes=0), store=store)).artifact

    heldout, _ = fdata.read_jsonl(TASKS / "heldout.jsonl", kind="instruction", bad_lines="fail")

    def score(path) -> dict:
        return score_heldout(path, heldout)

    results: dict = {"base": {**score(base.path), "trainable_fraction": 0.0, "model_params": base.metrics.get("n_params")}}
    print("base exact match", results["base"]["exact_match"], flush=True)

    common = dict(data=str((TASKS / "train.jsonl").relative_to(ROOT)), max_steps=args.sft_steps, batch_size=8,
                  context=128, eval_examples=0, threads=args.threads, warmup_steps=20, checkpoint_every_minutes=0)
    sft = {}
    for method in ("lora", "full"):
        extra = dict(lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
                     lora_targets=args.lora_targets.split(",")) if method == "lora" else {}
        art = timed(f"sft_{method}", lambda: finetune.run(source=base.id, params=finetune.Params(method=method, **common, **extra),
                                                            store=store)).artifact
        sft[method] = art
        results[method] = {**score(art.path), "trainable_fraction": art.metrics["trainable_fraction"],
                           "trainable_params": art.metrics["trainable_params"], "val_loss": art.metrics["val_loss"],
                           "lr": finetune.Params(method=method).peak_lr(), "train_seconds": art.metrics["train_seconds"]}
        print(method, results[method]["exact_match"], results[method]["per_task"], flush=True)

    # ---- DPO from the LoRA SFT model (an unmerged LoRA artifact: load_model folds its adapters in)
    sft_path = sft["lora"].path
    tok = load_tokenizer(sft_path)
    pref_records, _ = fdata.read_jsonl(TASKS / "preferences_heldout.jsonl", kind="preference", bad_lines="fail")
    pref_pairs = fdata.encode_preferences(pref_records, tok, context=128, path=TASKS, bad_lines="fail", rejects=[])
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    before_model, _, _ = load_model(sft_path)
    acc_before = preference_accuracy(before_model, pref_pairs, pad_id=pad)
    dpo_art = timed("dpo", lambda: finetune.run(source=sft["lora"].id, params=finetune.Params(
        method="dpo", data=str((TASKS / "preferences.jsonl").relative_to(ROOT)), max_steps=args.dpo_steps,
        batch_size=8, beta=0.1, lora_rank=args.lora_rank, lora_alpha=2.0 * args.lora_rank,
        lora_targets=args.lora_targets.split(","), eval_examples=64, threads=args.threads, warmup_steps=10,
        checkpoint_every_minutes=0), store=store)).artifact
    after_model, _, _ = load_model(dpo_art.path)
    acc_after = preference_accuracy(after_model, pref_pairs, pad_id=pad)
    results["dpo"] = {"heldout_pref_acc_before": acc_before, "heldout_pref_acc_after": acc_after,
                      "train_reward_margin": dpo_art.metrics.get("reward_margin"),
                      "train_reward_acc": dpo_art.metrics.get("reward_acc"),
                      "trainable_fraction": dpo_art.metrics["trainable_fraction"],
                      "sft_exact_match_after_dpo": score(dpo_art.path)["exact_match"]}
    print("dpo", results["dpo"], flush=True)

    ratio = results["lora"]["exact_match"] / results["full"]["exact_match"] if results["full"]["exact_match"] else None
    summary = {
        "benchmark": "finetune", "quick": args.quick,
        "settings": {"preset": args.preset, "pretrain_steps": args.pretrain_steps, "sft_steps": args.sft_steps,
                     "dpo_steps": args.dpo_steps, "lora_rank": args.lora_rank, "lora_targets": args.lora_targets,
                     "batch_size": 8, "context": 128, "threads": args.threads, "heldout_examples": len(heldout),
                     "heldout_pairs": len(pref_pairs)},
        "results": results,
        "lora_over_full": ratio,
        "targets": {"lora_ge_90pct_of_full": ratio is not None and ratio >= 0.9,
                    "lora_trainable_le_2pct": results["lora"]["trainable_fraction"] <= 0.02,
                    "sft_well_above_base": results["lora"]["exact_match"] >= results["base"]["exact_match"] + 0.2},
        "seconds": timings,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "load_avg_1m": os.getloadavg()[0]},
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "finetune.json").write_text(json.dumps(summary, indent=2) + "\n")
    r = results
    tasks = list(r["full"]["per_task"])
    lines = [
        f"# finetune (sample tasks, {len(heldout)} held-out examples; {args.preset} base, {args.pretrain_steps} pretrain steps, "
        f"{args.sft_steps} SFT steps)", "",
        "| model | held-out exact match | trainable | " + " | ".join(tasks) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in tasks) + " |",
    ]
    for name in ("base", "lora", "full"):
        lines.append(f"| {name} | {r[name]['exact_match']:.3f} | {100 * r[name]['trainable_fraction']:.2f}% | "
                     + " | ".join(f"{r[name]['per_task'].get(t, 0):.2f}" for t in tasks) + " |")
    lines += [
        "",
        f"LoRA / full = {ratio:.3f}" if ratio is not None else "LoRA / full = n/a (full scored 0)",
        "",
        f"DPO (from the LoRA SFT model, {args.dpo_steps} steps, beta 0.1): held-out preference accuracy "
        f"{acc_before:.3f} -> {acc_after:.3f} ({len(pref_pairs)} pairs); final train reward margin "
        f"{results['dpo']['train_reward_margin']}, reward accuracy {results['dpo']['train_reward_acc']}",
        "",
        f"Seconds: {timings}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs.",
    ]
    (RESULTS / "finetune.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
