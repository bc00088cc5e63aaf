"""Quality per CPU minute: validation bits per character on tiny-shakespeare in 180 s of wall time.

Side by side in one run:

* the anchor, nanoGPT's published CPU recipe re-implemented minimally here (character-level
  GPT: 4 layers, 4 heads, 128 dims, context 64, batch 12, 2000 iterations, AdamW lr 1e-3,
  betas (0.9, 0.99), weight decay 0.1 on all matrices, warmup 100 then cosine to 1e-4,
  clip 1.0, no dropout, LayerNorm without biases, GELU MLP, learned positions, tied head);
* dsk's best dense and best MoE CPU configs (found by the search recorded in
  docs/pretrain.md), trained by `dsk.train.train` with a wall-clock cosine schedule so that
  *everything* — tokenizer training, encoding, model build, training and the final
  evaluation — fits in 180 s;
* training tokens/s of the `tiny` preset, fp32 and bf16, dense and MoE.

Validation is the last 10% of the characters; the loss is measured on the whole validation
text in non-overlapping windows and converted to bits per character (the text is ASCII,
so characters = bytes).

    $ python benchmarks/pretrain_cpu.py             # the full run (~12 min on 2 cores)
    $ python benchmarks/pretrain_cpu.py --quick     # a smoke run (~2 min)
    $ python benchmarks/pretrain_cpu.py --only dsk-dense,dsk-moe   # just those entries (~6 min)
    $ python benchmarks/pretrain_cpu.py --trial '{"name": "x", "vocab": 512, ...}' --budget 180
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

TEXT = REPO / "data" / "sample" / "tinyshakespeare.txt"
RESULTS = Path(__file__).resolve().parent / "results"
BUDGET_S = 180.0

# The configs for the final run (docs/pretrain.md lists every config tried): the `cpu` and
# `cpu-moe` model presets as shipped (d128, 4 layers), BPE 512, context 128 x batch 16, AdamW
# lr 4e-3 with weight decay 0.3 (a bf16 run sees ~10 epochs of the text and overfits without
# it), warmup 50 then cosine to 0 over the wall-clock budget, and bf16
# autocast: on this AVX512-BF16 CPU a bf16 step takes 0.55x the fp32 one at the same loss per step.
_RECIPE = {"tokenizer": "bpe", "vocab": 512, "context": 128, "batch": 16, "lr": 4e-3, "warmup": 50,
           "min_lr_ratio": 0.0, "weight_decay": 0.3, "beta2": 0.95, "optimizer": "adamw", "precision": "bf16"}
BEST_DENSE = {"name": "dsk-dense", "preset": "cpu", **_RECIPE}
DENSE_FP32 = {"name": "dsk-dense-fp32", "preset": "cpu", **_RECIPE, "precision": "fp32"}
BEST_MOE = {"name": "dsk-moe", "preset": "cpu-moe", **_RECIPE}
FINAL = (BEST_DENSE, DENSE_FP32, BEST_MOE)


def split_text() -> tuple[str, str]:
    text = TEXT.read_text()
    cut = int(len(text) * 0.9)
    return text[:cut], text[cut:]


# =========================================================================== the anchor


class AnchorBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d, bias=False)
        self.c_attn = nn.Linear(d, 3 * d, bias=False)
        self.c_proj = nn.Linear(d, d, bias=False)
        self.ln_2 = nn.LayerNorm(d, bias=False)
        self.c_fc = nn.Linear(d, 4 * d, bias=False)
        self.mlp_proj = nn.Linear(4 * d, d, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class AnchorGPT(nn.Module):
    """nanoGPT's architecture (bias=False, dropout=0), written from its description."""

    def __init__(self, vocab: int, block: int, n_layer: int = 4, n_head: int = 4, d: int = 128):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(block, d)
        self.h = nn.ModuleList(AnchorBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d, bias=False)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def anchor_setup(threads: int):
    torch.set_num_threads(threads)
    torch.manual_seed(1337)
    text = TEXT.read_text()
    chars = sorted(set(text))  # nanoGPT builds the character vocabulary from the whole text
    stoi = {c: i for i, c in enumerate(chars)}
    train_text, val_text = split_text()
    train = torch.tensor([stoi[c] for c in train_text], dtype=torch.long)
    val = torch.tensor([stoi[c] for c in val_text], dtype=torch.long)
    model = AnchorGPT(len(chars), 64)
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.99))
    return model, opt, train, val, val_text


def anchor_step(model, opt, train, it, iters=2000, block=64, batch=12):
    warmup, lr_max, lr_min = 100, 1e-3, 1e-4
    if it < warmup:
        lr = lr_max * (it + 1) / (warmup + 1)
    else:
        lr = lr_min + 0.5 * (1 + math.cos(math.pi * min(1.0, (it - warmup) / (iters - warmup)))) * (lr_max - lr_min)
    for g in opt.param_groups:
        g["lr"] = lr
    ix = torch.randint(len(train) - block, (batch,))
    x = torch.stack([train[i : i + block] for i in ix])
    y = torch.stack([train[i + 1 : i + 1 + block] for i in ix])
    loss = F.cross_entropy(model(x).view(-1, model.lm_head.weight.shape[0]), y.view(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return float(loss)


@torch.no_grad()
def windows_loss(forward, val: torch.Tensor, block: int, batch: int = 64) -> float:
    """Mean next-token loss (nats) over non-overlapping windows covering ``val``."""
    n = (len(val) - 1) // block
    total, count = 0.0, 0
    for i in range(0, n, batch):
        starts = torch.arange(i, min(n, i + batch)) * block
        x = torch.stack([val[s : s + block] for s in starts])
        y = torch.stack([val[s + 1 : s + 1 + block] for s in starts])
        logits = forward(x)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"))
        count += y.numel()
    return total / count


def run_anchor(iters: int = 2000, threads: int = 2) -> dict:
    started = time.perf_counter()
    model, opt, train, val, val_text = anchor_setup(threads)
    t_train = time.perf_counter()
    for it in range(iters):
        anchor_step(model, opt, train, it, iters)
    train_s = time.perf_counter() - t_train
    model.eval()
    loss = windows_loss(model, val, 64)
    wall = time.perf_counter() - started
    # one token per character: bits/char = nats/token / ln 2
    return {"name": "anchor-nanogpt-char", "bpc": round(loss / math.log(2), 4), "val_loss_nats": round(loss, 4),
            "wall_s": round(wall, 1), "train_s": round(train_s, 1), "iters": iters,
            "ms_per_iter": round(1000 * train_s / iters, 2), "tokens": iters * 12 * 64,
            "tokens_per_s": round(iters * 12 * 64 / train_s, 1), "params": sum(p.numel() for p in model.parameters())}


def anchor_ms_per_iter(threads: int, n: int = 30) -> float:
    """Calibration: the anchor's time per training iteration on this CPU."""
    model, opt, train, _, _ = anchor_setup(threads)
    for it in range(5):
        anchor_step(model, opt, train, it)
    t = time.perf_counter()
    for it in range(n):
        anchor_step(model, opt, train, 5 + it)
    return 1000 * (time.perf_counter() - t) / n


# =========================================================================== dsk trials


def encode(tokenizer: str, vocab: int, train_text: str, val_text: str):
    from dsk.data.tokenizer import Tokenizer, train_bpe, train_char

    paragraphs = train_text.split("\n\n")
    hf = train_bpe(paragraphs, vocab_size=vocab) if tokenizer == "bpe" else train_char([train_text])
    tok = Tokenizer(hf)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    train = np.asarray(tok.encode(train_text), dtype=dtype)
    val = np.asarray(tok.encode(val_text), dtype=dtype)
    return tok, train, val


def run_dsk(trial: dict, *, budget_s: float = BUDGET_S, threads: int = 2, seed: int = 0) -> dict:
    """Train one config; the whole call (tokenizer included) is held to ``budget_s``."""
    started = time.perf_counter()
    torch.set_num_threads(threads)
    seed = trial.get("seed", seed)
    from dsk import console
    from dsk.models import ModelConfig, Transformer
    from dsk.train import TokenData, TrainConfig, train

    console.set_mode(quiet=True)
    train_text, val_text = split_text()
    tok, train_ids, val_ids = encode(trial.get("tokenizer", "bpe"), trial.get("vocab", 512), train_text, val_text)
    context = trial["context"]
    data = TokenData(train=train_ids, val=val_ids, vocab_size=tok.vocab_size, context=context,
                     batch_size=trial["batch"], seed=seed, val_bytes=len(val_text.encode()), eval_tokens=10**9)
    torch.manual_seed(seed)
    if "preset" in trial:  # a shipped preset (what `dsk pretrain --preset` builds), plus any overrides
        cfg = ModelConfig.preset(trial["preset"], vocab_size=tok.vocab_size, max_seq_len=context, **trial.get("arch", {}))
    else:
        cfg = ModelConfig(**{"vocab_size": tok.vocab_size, "max_seq_len": context, **trial["arch"]})
    model = Transformer(cfg)
    reserve = trial.get("eval_reserve") or estimate_eval_seconds(model, data, trial.get("precision", "fp32"))
    remaining = budget_s - (time.perf_counter() - started) - reserve
    fixed_steps = trial.get("schedule_clock", "time") == "steps"  # a quality-per-step trial: no time budget
    tcfg = TrainConfig(
        max_steps=trial.get("max_steps", 10**9), batch_size=trial["batch"], grad_accum=trial.get("grad_accum", 1),
        lr=trial["lr"], min_lr_ratio=trial.get("min_lr_ratio", 0.0), warmup_steps=trial.get("warmup", 50),
        schedule_clock="steps" if fixed_steps else "time", lr_decay=trial.get("lr_decay", "cosine"),
        cooldown_frac=trial.get("cooldown_frac", 1.0), weight_decay=trial.get("weight_decay", 0.1),
        beta1=trial.get("beta1", 0.9), beta2=trial.get("beta2", 0.95), grad_clip=trial.get("grad_clip", 1.0),
        optimizer=trial.get("optimizer", "adamw"), precision=trial.get("precision", "fp32"), device="cpu",
        eval_every=0, log_every=50, muon_lr_scale=trial.get("muon_lr_scale", 5.0), compile=trial.get("compile", False),
        max_minutes=0.0 if fixed_steps else max(remaining, 1.0) / 60, threads=threads,
    )
    with tempfile.TemporaryDirectory() as run_dir:
        result = train(model, data, tcfg, run_dir=Path(run_dir))
        records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train_losses = [r["loss"] for r in records if r["split"] == "train"]
    wall = time.perf_counter() - started
    return {
        "name": trial["name"], "bpc": round(result.val_bpb, 4), "val_loss_nats_per_token": round(result.val_loss, 4),
        "last_train_loss": train_losses[-1] if train_losses else None,
        "wall_s": round(wall, 1), "train_s": round(result.seconds, 1), "steps": result.steps, "tokens": result.tokens,
        "tokens_per_s": result.tokens_per_s, "chars_per_token": round(len(val_text) / len(val_ids), 3),
        "params": model.num_params(), "active_params": model.num_params(active=True), "budget_s": round(budget_s, 1),
        "config": trial,
    }


@torch.no_grad()
def estimate_eval_seconds(model, data, precision: str = "fp32") -> float:
    """Time one validation batch (after a warm-up call, in the run's precision) and scale to the whole pass."""
    from dsk.train.loop import autocast_context

    batches = list(data.val_batches())
    model.eval()
    with autocast_context("cpu", precision):
        model(batches[0][0])  # the first call pays one-off kernel set-up: timing it overestimated by ~30 s
        t = time.perf_counter()
        model(batches[0][0])
        per_batch = time.perf_counter() - t
    model.train()
    return 1.5 * per_batch * len(batches) + 2.0


def tokens_per_second(threads: int = 2, steps: int = 40) -> list[dict]:
    """Training tokens/s of the `tiny` preset: fp32/bf16 x dense/MoE (batch 16 x 256, BPE 512)."""
    from dsk import console
    from dsk.models import ModelConfig, Transformer
    from dsk.train import TokenData, TrainConfig, train

    torch.set_num_threads(threads)
    console.set_mode(quiet=True)
    train_text, val_text = split_text()
    tok, train_ids, val_ids = encode("bpe", 512, train_text[:300_000], val_text[:20_000])
    rows = []
    for variant, arch in (("dense", {"n_routed_experts": 0, "n_dense_layers": 2}), ("moe", {})):
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            model = Transformer(ModelConfig.preset("tiny", vocab_size=tok.vocab_size, max_seq_len=256, **arch))
            data = TokenData(train=train_ids, val=val_ids, vocab_size=tok.vocab_size, context=256, batch_size=16,
                             seed=0, val_bytes=len(val_text[:20_000]), eval_tokens=256)
            tcfg = TrainConfig(max_steps=steps, batch_size=16, lr=1e-3, warmup_steps=5, precision=precision,
                               device="cpu", eval_every=0, log_every=10, threads=threads)
            with tempfile.TemporaryDirectory() as run_dir:
                train(model, data, tcfg, run_dir=Path(run_dir))
                timing = [json.loads(x) for x in (Path(run_dir) / "timing.jsonl").read_text().splitlines()]
            speeds = [r["tokens_per_s"] for r in timing if r["split"] == "train"][1:]  # first interval = warm-up
            rows.append({"preset": "tiny", "variant": variant, "precision": precision,
                         "tokens_per_s": round(float(np.median(speeds)), 1), "params": model.num_params()})
    return rows


# =========================================================================== orchestration


def run_isolated(args: list[str], cores: str | None = None) -> dict:
    """Run one measurement in a fresh process (optionally pinned to CPU cores)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), *args]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


def search(trials_file: Path, slots: int, out_dir: Path, anchor: bool, ref_ms: float, budget: str,
           cores_per_slot: int = 2) -> None:
    """Device-machine search: trials in parallel, each pinned to its own cores, budgets calibrated by the anchor."""
    import concurrent.futures as cf

    trials = json.loads(trials_file.read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    n = cores_per_slot
    cores = [",".join(str(n * i + j) for j in range(n)) for i in range(slots)]
    threads = ["--threads", str(n)]
    jobs = ([["--anchor", *threads]] if anchor else []) + [
        ["--trial", json.dumps(t), "--budget", budget, "--ref-ms", str(ref_ms), *threads] for t in trials]
    results = []
    with cf.ThreadPoolExecutor(max_workers=slots) as pool:
        free = list(cores)
        futures = {}
        pending = list(jobs)
        while pending or futures:
            while pending and free:
                core = free.pop()
                job = pending.pop(0)
                futures[pool.submit(run_isolated, job, core)] = (core, job)
            done, _ = cf.wait(futures, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                core, job = futures.pop(fut)
                free.append(core)
                try:
                    res = fut.result()
                except Exception as exc:  # keep the search going; record the failure
                    res = {"name": job[-1][:60], "error": str(exc)[-500:]}
                results.append(res)
                print(json.dumps(res), flush=True)
                (out_dir / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))


def write_results(payload: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "pretrain_cpu.json").write_text(json.dumps(payload, indent=2) + "\n")
    lines = [
        "# pretrain_cpu: tiny-shakespeare, validation bits per character, 180 s wall budget",
        "",
        f"{payload['machine']}; {payload['note']}",
        "",
        "| run | bits/char | wall s | train s | steps | tokens | tokens/s | params |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in payload["quality"]:
        lines.append(f"| {r['name']} | {r['bpc']:.3f} | {r['wall_s']} | {r['train_s']} | {r.get('steps', r.get('iters'))} "
                     f"| {r['tokens']:,} | {r['tokens_per_s']:,.0f} | {r['params']:,} |")
    lines += ["", "Training tokens/s of the `tiny` preset (batch 16 x 256, BPE 512):", "",
              "| variant | precision | tokens/s |", "| --- | --- | ---: |"]
    for r in payload["tokens_per_s"]:
        lines.append(f"| {r['variant']} | {r['precision']} | {r['tokens_per_s']:,.0f} |")
    (RESULTS / "pretrain_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short budgets: a smoke run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--trial", help="run one dsk config (JSON) and print its result")
    ap.add_argument("--budget", default=str(BUDGET_S), help="seconds, or 'auto' (180 s scaled by the anchor speed)")
    ap.add_argument("--anchor", action="store_true", help="run only the anchor")
    ap.add_argument("--only", help="comma-separated final entries to run alone, e.g. dsk-dense,dsk-moe "
                                   "(appends to results/pretrain_cpu_entries.jsonl)")
    ap.add_argument("--iters", type=int, default=2000, help="anchor iterations")
    ap.add_argument("--search", type=Path, help="JSON list of trials to run in parallel (device machine)")
    ap.add_argument("--slots", type=int, default=7)
    ap.add_argument("--cores-per-slot", type=int, default=2, help="--search: CPU cores (and torch threads) per trial")
    ap.add_argument("--with-anchor", action="store_true", help="--search: run the anchor too (calibration)")
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", RESULTS)))
    ap.add_argument("--ref-ms", type=float, default=float(os.environ.get("ANCHOR_REF_MS", 0) or 0),
                    help="the anchor's ms/iteration on the target machine (for --budget auto)")
    args = ap.parse_args()

    if args.search:
        search(args.search, args.slots, args.out, anchor=args.with_anchor, ref_ms=args.ref_ms, budget=args.budget,
               cores_per_slot=args.cores_per_slot)
        return 0
    if args.anchor:
        print(json.dumps(run_anchor(iters=args.iters, threads=args.threads)))
        return 0
    if args.trial:
        budget = BUDGET_S
        calib = None
        if args.budget == "auto":
            calib = anchor_ms_per_iter(args.threads)
            budget = BUDGET_S * calib / args.ref_ms if args.ref_ms else BUDGET_S
        else:
            budget = float(args.budget)
        res = run_dsk(json.loads(args.trial), budget_s=budget, threads=args.threads)
        res["anchor_ms_per_iter_here"] = calib and round(calib, 2)
        print(json.dumps(res))
        return 0

    budget = 30.0 if args.quick else BUDGET_S
    if args.only:  # just some of the final entries (no anchor, no tokens/s table)
        names = args.only.split(",")
        unknown = sorted(set(names) - {t["name"] for t in FINAL})
        if unknown:
            ap.error(f"--only: unknown entry {unknown[0]!r}; entries: {', '.join(t['name'] for t in FINAL)}")
        load_start = os.getloadavg()[0]
        rows = [run_isolated(["--trial", json.dumps(t), "--budget", str(budget), "--threads", str(args.threads)])
                for t in FINAL if t["name"] in names]
        note = {"load_start": round(load_start, 1), "load_end": round(os.getloadavg()[0], 1), "threads": args.threads}
        RESULTS.mkdir(exist_ok=True)
        with open(RESULTS / "pretrain_cpu_entries.jsonl", "a") as f:
            for r in rows:
                f.write(json.dumps({**r, **note}) + "\n")
        for r in rows:
            print(f"{r['name']}: {r['bpc']:.4f} bits/char, wall {r['wall_s']} s, {r['steps']} steps, "
                  f"{r['tokens_per_s']:,.0f} tokens/s")
        return 0

    # ---- the benchmark: anchor + best dense + best MoE, each in its own process, then tokens/s
    iters = 200 if args.quick else 2000
    load_start = os.getloadavg()[0]
    quality = [run_isolated(["--anchor", "--iters", str(iters), "--threads", str(args.threads)])]
    for trial in FINAL:
        quality.append(run_isolated(["--trial", json.dumps(trial), "--budget", str(budget), "--threads", str(args.threads)]))
    speeds = tokens_per_second(threads=args.threads, steps=20 if args.quick else 60)
    payload = {
        "benchmark": "pretrain_cpu", "budget_s": budget, "quick": args.quick,
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}, {args.threads} threads",
        "note": f"1-min load average at start {load_start:.1f}, at end {os.getloadavg()[0]:.1f}",
        "quality": quality, "tokens_per_s": speeds,
    }
    write_results(payload)
    return 0


if __name__ == "__main__":
    sys.exit(main())
