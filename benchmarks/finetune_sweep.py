"""Sweep SFT settings for `dsk finetune` on the sample tasks: held-out exact match per config.

The tuning behind the learning rates and LoRA shape of benchmarks/finetune.py: every config
finetunes the same base on data/sample/tasks/train.jsonl for the same steps and is scored by
greedy exact match on data/sample/tasks/heldout.jsonl. Configs run as parallel processes,
each in its own copy of the workspace (so the base is built once and never re-trained).

    $ python benchmarks/finetune_sweep.py --workspace /tmp/ws --grid lr --jobs 2
    $ python benchmarks/finetune_sweep.py --workspace /tmp/ws --pretrain-steps 4000 --grid lr --jobs 8

A config is a JSON object of `dsk finetune` params (method, lr, lora_rank, lora_alpha,
lora_targets, ...; "seed" sets the run's seed); --grid names a built-in list, --configs takes a JSON list. Appends one JSON
line per config to --out (default benchmarks/results/finetune_sweep.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from finetune import ROOT, TASKS, build_base, copy_test, score_heldout, val_tokens  # noqa: E402

sys.path.insert(0, str(ROOT / "src"))


def lora(lr, rank=4, alpha=None, targets="attn", **kw):
    return dict(method="lora", lr=lr, lora_rank=rank, lora_alpha=alpha if alpha is not None else 2.0 * rank,
                lora_targets=targets.split(","), **kw)


GRIDS = {
    # round 1: learning rates of both methods; LoRA shapes within 2% of a dim-128 model
    # (attn r4 = 1.84%, mlp r3 = 1.87%, attn+mlp r1 = 1.12%), and rank-16 shapes to see which target matters
    "lr": [dict(method="full", lr=lr) for lr in (1e-3, 2e-3, 4e-3, 8e-3)]
    + [lora(lr) for lr in (5e-3, 2e-2, 5e-2)]
    + [lora(lr, rank=3, targets="mlp") for lr in (5e-3, 1e-2, 2e-2)]
    + [lora(lr, rank=1, targets="attn,mlp") for lr in (1e-2, 2e-2, 5e-2)]
    + [lora(1e-2, rank=1, alpha=8.0, targets="attn,mlp")]
    + [lora(1e-2, rank=16, targets=t) for t in ("attn", "mlp", "attn,mlp")],
    "lr-short": [dict(method="full", lr=lr) for lr in (2e-3, 4e-3)] + [lora(2e-2)]
    + [lora(1e-2, rank=3, targets="mlp")] + [lora(lr, rank=1, targets="attn,mlp") for lr in (2e-2, 5e-2)]
    + [lora(1e-2, rank=16, targets="attn,mlp")],
    # DPO from an SFT model: learning rate, beta, steps
    "dpo": [dict(method="dpo", lr=lr, beta=beta, max_steps=steps, lora_rank=4, lora_alpha=8.0,
                 sft=dict(method="full", lr=2e-3))
            for lr in (5e-4, 2e-3, 5e-3) for beta in (0.1, 0.5) for steps in (100, 300)],
}


def sft_params(config: dict, *, sft_steps: int, threads: int):
    from dsk import finetune

    return finetune.Params(data=str((TASKS / "train.jsonl").relative_to(ROOT)), max_steps=sft_steps, batch_size=8,
                           context=128, eval_examples=0, threads=threads, warmup_steps=20,
                           checkpoint_every_minutes=0, **config)


def run_dpo(config: dict, *, store, base_id: str, sft_steps: int, threads: int, seed: int = 0) -> dict:
    """SFT with config["sft"], then DPO with the rest of config: held-out preference accuracy before/after."""
    from dsk import finetune
    from dsk.data.tokenizer import load_tokenizer
    from dsk.finetune import data as fdata
    from dsk.evaluation.tasks import preference_accuracy
    from dsk.models import load_model

    config = dict(config)
    config.pop("seed", None)
    sft_cfg = config.pop("sft")
    sft = finetune.run(source=base_id, params=sft_params(sft_cfg, sft_steps=sft_steps, threads=threads), store=store,
                       seed=seed).artifact
    tok = load_tokenizer(sft.path)
    records, _ = fdata.read_jsonl(TASKS / "preferences_heldout.jsonl", kind="preference", bad_lines="fail")
    pairs = fdata.encode_preferences(records, tok, context=128, path=TASKS, bad_lines="fail", rejects=[])
    pad = tok.pad_id if tok.pad_id is not None else tok.eot_id
    before = preference_accuracy(load_model(sft.path)[0], pairs, pad_id=pad)
    config.setdefault("warmup_steps", 10)
    t = time.perf_counter()
    dpo = finetune.run(source=sft.id, params=finetune.Params(
        data=str((TASKS / "preferences.jsonl").relative_to(ROOT)), batch_size=8, eval_examples=0, threads=threads,
        checkpoint_every_minutes=0, **config), store=store, seed=seed).artifact
    seconds = time.perf_counter() - t
    heldout, _ = fdata.read_jsonl(TASKS / "heldout.jsonl", kind="instruction", bad_lines="fail")
    return {"config": {**config, "sft": sft_cfg, **({"seed": seed} if seed else {})}, "base": base_id, "sft_steps": sft_steps,
            "pref_acc_before": before, "pref_acc_after": preference_accuracy(load_model(dpo.path)[0], pairs, pad_id=pad),
            "reward_margin": dpo.metrics.get("reward_margin"), "reward_acc": dpo.metrics.get("reward_acc"),
            "exact_match_sft": score_heldout(sft.path, heldout)["exact_match"],
            "exact_match": score_heldout(dpo.path, heldout)["exact_match"], "per_task": {},
            "trainable_fraction": dpo.metrics["trainable_fraction"], "val_loss": dpo.metrics.get("val_loss"),
            "device": dpo.metrics.get("device"), "seconds": round(seconds, 1)}


def run_one(config: dict, *, workspace: Path, base_id: str, sft_steps: int, threads: int) -> dict:
    """Finetune ``base_id`` with ``config`` (in this process) and score it."""
    os.environ["DSK_HOME"] = str(workspace)
    os.chdir(ROOT)
    import torch

    from dsk import finetune
    from dsk.artifacts import Store
    from dsk.finetune import data as fdata

    torch.set_num_threads(threads)
    store = Store.open()
    seed = int(config.get("seed", 0))  # the run's seed (data split, batch order, adapter init), not a param
    if config.get("method") == "dpo":
        return run_dpo(config, store=store, base_id=base_id, sft_steps=sft_steps, threads=threads, seed=seed)
    params = sft_params({k: v for k, v in config.items() if k != "seed"}, sft_steps=sft_steps, threads=threads)
    t = time.perf_counter()
    art = finetune.run(source=base_id, params=params, store=store, seed=seed).artifact
    seconds = time.perf_counter() - t
    heldout, _ = fdata.read_jsonl(TASKS / "heldout.jsonl", kind="instruction", bad_lines="fail")
    s = score_heldout(art.path, heldout)
    return {"config": config, "base": base_id, "sft_steps": sft_steps, "exact_match": s["exact_match"],
            "per_task": s["per_task"], "trainable_fraction": art.metrics["trainable_fraction"],
            "val_loss": art.metrics["val_loss"], "device": art.metrics.get("device"), "seconds": round(seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workspace", required=True, help="DSK_HOME holding (or to hold) the base")
    ap.add_argument("--pretrain-steps", type=int, default=1500)
    ap.add_argument("--preset", default="cpu")
    ap.add_argument("--repeat-fraction", type=float, default=0.0, help="pretrain --repeat-fraction of the base")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3, help="peak learning rate of the base's pretraining")
    ap.add_argument("--sft-steps", type=int, default=400)
    ap.add_argument("--grid", default="lr", choices=sorted(GRIDS))
    ap.add_argument("--configs", default=None, help="JSON list of param dicts (instead of --grid)")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-place", action="store_true",
                    help="run the configs one at a time in --workspace itself (no copies), so their artifacts "
                    "stay there and a later benchmarks/finetune.py --workspace run reuses them")
    ap.add_argument("--out", default=str(HERE / "results" / "finetune_sweep.jsonl"))
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # worker: one JSON config
    ap.add_argument("--base-id", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.one:
        print("RESULT " + json.dumps(run_one(json.loads(args.one), workspace=Path(args.workspace), base_id=args.base_id,
                                             sft_steps=args.sft_steps, threads=args.threads)), flush=True)
        return

    os.environ["DSK_HOME"] = args.workspace
    os.chdir(ROOT)
    from dsk.artifacts import Store

    t = time.perf_counter()
    store = Store.open()
    base = build_base(store, preset=args.preset, pretrain_steps=args.pretrain_steps, threads=args.threads,
                      repeat_fraction=args.repeat_fraction, lr=args.pretrain_lr)
    copy = copy_test(base.path, val_tokens(store))
    print(f"base {base.id} ({args.pretrain_steps} steps, val_loss {base.metrics.get('val_loss')}, val_bpb "
          f"{base.metrics.get('val_bpb')}) in {time.perf_counter() - t:.0f}s; copy test (loss on a span, then on its "
          f"repeat): {copy}", flush=True)
    configs = json.loads(args.configs) if args.configs else GRIDS[args.grid]
    scratch = Path(tempfile.mkdtemp(prefix="dsk-ft-sweep-"))
    running: list[tuple[subprocess.Popen, dict, Path]] = []
    pending = list(enumerate(configs))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    if args.in_place:
        args.jobs = 1

    def launch(i: int, config: dict) -> None:
        ws = Path(args.workspace) if args.in_place else scratch / f"w{i}"
        if not args.in_place:
            shutil.copytree(args.workspace, ws, ignore=shutil.ignore_patterns("runs", "tmp"))
        cmd = [sys.executable, __file__, "--workspace", str(ws), "--base-id", base.id, "--sft-steps",
               str(args.sft_steps), "--threads", str(args.threads), "--one", json.dumps(config)]
        running.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                         env={**os.environ, "OMP_NUM_THREADS": str(args.threads)}), config, ws))

    while pending or running:
        while pending and len(running) < args.jobs:
            launch(*pending.pop(0))
        time.sleep(1)
        for proc, config, ws in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, config, ws))
            text = proc.stdout.read()
            lines = [ln for ln in text.splitlines() if ln.startswith("RESULT ")]
            if not lines:
                print(f"FAILED {config}:\n{text[-2000:]}", flush=True)
                continue
            rec = json.loads(lines[-1][7:])
            rec["pretrain_steps"] = args.pretrain_steps
            rec["repeat_fraction"] = args.repeat_fraction
            rec["pretrain_lr"] = args.pretrain_lr
            rec["load_avg_1m"] = round(os.getloadavg()[0], 2)
            rec["base_val_loss"] = base.metrics.get("val_loss")
            rec["base_copy_test"] = copy
            with out.open("a") as f:
                f.write(json.dumps(rec) + "\n")
            dpo = f"pref {rec['pref_acc_before']:.2f} -> {rec['pref_acc_after']:.2f}  " if "pref_acc_before" in rec else ""
            print(f"{dpo}{rec['exact_match']:.3f}  {rec['trainable_fraction'] * 100:6.2f}%  {rec['per_task']}  {config}  "
                  f"({rec['seconds']}s, {rec['device']})", flush=True)
            if not args.in_place:
                shutil.rmtree(ws, ignore_errors=True)


if __name__ == "__main__":
    main()
