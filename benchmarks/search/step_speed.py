"""Interleaved step-time comparison of training variants in one process (robust to machine load).

    $ python benchmarks/search/step_speed.py --threads 1 --rounds 5 --variants eager,bf16,compile
"""
import argparse, json, math, os, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
import torch
import torch.nn.functional as F
from dsk.models import ModelConfig, Transformer
from dsk.train.optim import make_optimizer

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=1)
ap.add_argument("--rounds", type=int, default=5)
ap.add_argument("--steps", type=int, default=10)
ap.add_argument("--variants", default="eager,bf16,compile")
ap.add_argument("--context", type=int, default=128)
ap.add_argument("--batch", type=int, default=16)
ap.add_argument("--arch", default="{}")
args = ap.parse_args()
torch.set_num_threads(args.threads)

ARCH = dict(attn="mha", dim=128, n_layers=4, n_heads=4, inter_dim=336, n_dense_layers=4, n_routed_experts=0, n_shared_experts=0)
ARCH.update(json.loads(args.arch))
V, T, B = 512, args.context, args.batch
g = torch.Generator().manual_seed(0)
data = torch.randint(0, V, (64, B, T + 1), generator=g)

def make(variant):
    torch.manual_seed(0)
    extra = {}
    for opt in variant.split("+"):
        if opt.startswith("cfg:"):
            k, v = opt[4:].split("=")
            extra[k] = json.loads(v)
    model = Transformer(ModelConfig(vocab_size=V, max_seq_len=T, **{**ARCH, **extra}))
    opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.0, betas=(0.9, 0.95), device="cpu")
    fwd = model
    t0 = time.perf_counter()
    if "compile" in variant.split("+"):
        fwd = torch.compile(model)
    bf16 = "bf16" in variant.split("+")
    def step(i):
        x, y = data[i % 64, :, :-1], data[i % 64, :, 1:]
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
        with ctx:
            loss = fwd(x, targets=y).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step(); opt.zero_grad(set_to_none=True)
        return loss
    step(0); step(1)  # warm-up (compile happens here)
    return step, time.perf_counter() - t0

variants = args.variants.split(",")
steps, setup = {}, {}
for v in variants:
    steps[v], setup[v] = make(v)
    print(f"{v}: setup+2 warm steps {setup[v]:.1f}s", flush=True)
times = {v: [] for v in variants}
for r in range(args.rounds):
    for v in variants:
        t = time.perf_counter()
        for i in range(args.steps):
            steps[v](i)
        times[v].append((time.perf_counter() - t) / args.steps * 1000)
base = variants[0]
for v in variants:
    med = sorted(times[v])[len(times[v]) // 2]
    ratios = sorted(a / b for a, b in zip(times[v], times[base]))
    print(json.dumps({"variant": v, "ms_per_step_median": round(med, 1), "ratio_to_" + base: round(ratios[len(ratios)//2], 3),
                      "setup_s": round(setup[v], 1), "load": os.getloadavg()[0]}), flush=True)
