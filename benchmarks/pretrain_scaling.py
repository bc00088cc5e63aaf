"""Multi-GPU scaling of the trainer: tokens/s on N GPUs over N x tokens/s on one (dense `gpt2` preset).

Each configuration is a torchrun launch of this file in ``--worker`` mode running
``dsk.train.train`` (the loop `dsk pretrain` runs) with bf16 autocast and torch.compile on
real text (tinyshakespeare's bytes as token ids, vocabulary 50304 so the FLOPs are GPT-2's),
32 sequences of 1024 tokens per GPU per step (weak scaling). Measured side by side:
1 GPU; N GPUs with DDP; DDP + bf16 gradient compression; DDP + PowerSGD (rank 4, from step
10); FSDP2. Tokens/s is the median of the last log intervals; the loss at the last step shows
what the compression costs. NCCL's NVLink multicast stays off (NCCL_NVLS_ENABLE=0 ...).

    $ python benchmarks/pretrain_scaling.py                 # on a machine with 2+ GPUs
    $ python benchmarks/pretrain_scaling.py --gpus 4 --steps 60
    $ python benchmarks/pretrain_scaling.py --quick         # CPU / gloo smoke test

Results: benchmarks/results/pretrain_scaling.{json,md} (or --out DIR).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

RESULTS = Path(__file__).resolve().parent / "results"
TEXT = REPO / "data" / "sample" / "tinyshakespeare.txt"
SAFE_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


class ByteData:
    """Random windows of a text's bytes; the global batch of a step is one seeded draw, each rank
    takes its rows (the same rule as dsk.train.data.TokenData), host tensors pinned."""

    def __init__(self, batch: int, context: int, rank: int, world: int, device: str):
        import numpy as np
        import torch

        raw = np.frombuffer(TEXT.read_bytes(), dtype=np.uint8)
        cut = int(len(raw) * 0.9)
        self.train, self.val = raw[:cut], raw[cut:]
        self.batch_size, self.context, self.rank, self.world = batch, context, rank, world
        self.pin = device.startswith("cuda")
        self.np, self.torch = np, torch

    def _windows(self, data, starts):
        block = data[starts[:, None] + self.np.arange(self.context + 1)].astype(self.np.int64)
        t = self.torch.from_numpy(block)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        return (x.pin_memory(), y.pin_memory()) if self.pin else (x, y)

    def batch(self, step: int, micro: int = 0):
        rng = self.np.random.default_rng([0, step, micro])
        starts = rng.integers(0, len(self.train) - self.context - 1, size=self.batch_size)
        rows = self.batch_size // self.world
        return self._windows(self.train, starts[self.rank * rows:(self.rank + 1) * rows])

    def val_batches(self):
        starts = self.np.arange(4) * self.context
        yield self._windows(self.val, starts)

    def bits_per_byte(self, loss: float) -> float:
        import math
        return loss / math.log(2)


def worker(args) -> None:
    import torch

    from dsk.models import ModelConfig, Transformer
    from dsk.train import TrainConfig, distributed, train

    info = distributed.env_info()
    kind = "cuda" if torch.cuda.is_available() else "cpu"
    quick = args.quick
    context = 64 if quick else 1024
    per_gpu = 2 if quick else args.batch
    data = ByteData(per_gpu * info.world, context, info.rank, info.world, kind)
    torch.manual_seed(0)
    over = dict(vocab_size=512 if quick else 50304, max_seq_len=context)
    if quick:
        over.update(dim=64, n_layers=2, n_heads=4, inter_dim=128, n_dense_layers=2)
    model = Transformer(ModelConfig.preset("gpt2", **over))
    steps = 6 if quick else args.steps
    log_every = 2 if quick else 10
    cfg = TrainConfig(max_steps=steps, batch_size=per_gpu * info.world, lr=1e-3, warmup_steps=10, precision="bf16",
                      device=kind, compile=not quick, eval_every=0, log_every=log_every,
                      checkpoint_every_minutes=0.0, strategy=args.strategy, comm_hook=args.comm_hook)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(model, data, cfg, run_dir=Path(tmp))
        wall = time.perf_counter() - t0
        if info.is_main:
            timing = [json.loads(x) for x in (Path(tmp) / "timing.jsonl").read_text().splitlines()]
            metrics = [json.loads(x) for x in (Path(tmp) / "metrics.jsonl").read_text().splitlines()]
    if info.is_main:
        rates = [t["tokens_per_s"] for t in timing if t["split"] == "train"][1:]  # the first holds the compile
        train_losses = [m for m in metrics if m["split"] == "train"]
        row = {"gpus": info.world, "strategy": args.strategy, "comm_hook": args.comm_hook,
               "global_batch": per_gpu * info.world, "tokens_per_s": round(statistics.median(rates[-5:])),
               "tokens_per_s_intervals": rates, "loss_curve": [(m["step"], m["loss"]) for m in train_losses],
               "final_train_loss": train_losses[-1]["loss"], "val_loss": result.val_loss, "wall_s": round(wall, 1),
               "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if kind == "cuda" else None}
        Path(args.result).write_text(json.dumps(row))
    distributed.shutdown()


CONFIGS = [  # (name, gpus: "1" or "N", strategy, comm hook)
    ("1gpu", "1", "ddp", "none"),
    ("ddp", "N", "ddp", "none"),
    ("ddp-bf16", "N", "ddp", "bf16"),
    ("ddp-powersgd", "N", "ddp", "powersgd"),
    ("fsdp", "N", "fsdp", "none"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, default=0, help="GPUs for the N-GPU runs (default: all visible)")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=32, help="sequences per GPU per step")
    ap.add_argument("--only", default="")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default="")
    ap.add_argument("--budget-s", type=float, default=560.0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--strategy", default="ddp", help=argparse.SUPPRESS)
    ap.add_argument("--comm-hook", default="none", help=argparse.SUPPRESS)
    ap.add_argument("--result", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    import torch

    if not torch.cuda.is_available() and not args.quick:
        print(f"{Path(__file__).name}: needs a CUDA GPU (results in docs/performance.md); --quick runs a CPU smoke test")
        return
    # a smoke run must not overwrite the measured results
    out = Path(args.out or (Path(tempfile.gettempdir()) / "dsk-bench-quick" if args.quick else RESULTS))
    out.mkdir(parents=True, exist_ok=True)
    n = args.gpus or max(2, torch.cuda.device_count())
    meta = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "gpus_visible": torch.cuda.device_count(), "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "steps": args.steps,
            "per_gpu_batch": args.batch}
    env = {**os.environ, **SAFE_NCCL_ENV, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}
    rows, started = [], time.perf_counter()
    for name, gpus, strategy, hook in CONFIGS:
        if args.only and name not in args.only.split(","):
            continue
        if time.perf_counter() - started > args.budget_s - 60:
            rows.append({"name": name, "error": "skipped: out of time budget"})
            continue
        world = 1 if gpus == "1" else n
        result = out / f".{name}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}", __file__,
               "--worker", "--strategy", strategy, "--comm-hook", hook, "--steps", str(args.steps),
               "--batch", str(args.batch), "--result", str(result)] + (["--quick"] if args.quick else [])
        left = args.budget_s - (time.perf_counter() - started)
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            ok = proc.returncode == 0 and result.is_file()
            row = {"name": name, **json.loads(result.read_text())} if ok else \
                {"name": name, "error": f"exit {proc.returncode}: " + " | ".join(
                    [x for x in proc.stderr.splitlines() if "Error" in x and "errors.html" not in x][-3:])[-600:]}
        except subprocess.TimeoutExpired:
            row = {"name": name, "error": "timed out"}
        result.unlink(missing_ok=True)
        rows.append(row)
        print(name, json.dumps({k: row.get(k) for k in ("tokens_per_s", "final_train_loss", "wall_s", "error")}), flush=True)
    base = next((r for r in rows if r["name"] == "1gpu" and "tokens_per_s" in r), None)
    for r in rows:
        if base and "tokens_per_s" in r:
            r["scaling_efficiency"] = round(r["tokens_per_s"] / (r["gpus"] * base["tokens_per_s"]), 3)
    (out / "pretrain_scaling.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Scaling, dense `gpt2` preset, {meta['gpu']} x{n}, torch {meta['torch']}, {meta['date']}; "
             f"{args.batch} x 1024 tokens per GPU per step, bf16, compile, {args.steps} steps", "",
             "| config | GPUs | tokens/s | scaling efficiency | final train loss | peak GiB |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | | | | failed: {r['error'][:150]} | |")
        else:
            lines.append(f"| {r['name']} | {r['gpus']} | {r['tokens_per_s']:,} | {r.get('scaling_efficiency', '')} | "
                         f"{r['final_train_loss']} | {r['peak_mem_gib']} |")
    (out / "pretrain_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
