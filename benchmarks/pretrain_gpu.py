"""Training speed on one GPU: dsk's dense and MoE GPT-2-sized presets against a nanoGPT anchor.

Measured side by side in one call, each variant in its own process (clean peak memory, one
failure cannot take the others down):

* the device's bf16 matrix rate (8192^3 products on random data: the MFU denominator);
* the anchor, nanoGPT's GPT-2 124M re-implemented minimally here (LayerNorm with biases, GELU
  MLP, learned positions, tied head, vocab 50304, SDPA causal attention, fused AdamW, bf16
  autocast, torch.compile, random tokens, batch 32 x 1024);
* dsk's ``gpt2`` (dense) and ``gpt2-moe`` presets trained with the trainer's step (bf16
  autocast, torch.compile, fused AdamW, clipping, router-bias balancing) and its variants
  (attention backend, batch, grouped vs looped experts);
* per variant: tokens/s, MFU = (6 x active matmul params + attention) FLOPs per token x tokens/s
  over the measured matrix rate, peak memory, the forward / backward / optimizer split (CUDA
  events around each phase, plus a torch.profiler table of 3 steps), and for MoE the expert
  load max/mean over the timed steps;
* ``micro``: the fused loss's cross-entropy kernel candidates (dsk.models.ce_kernel) against the
  compiled PyTorch expression and a copy of the same bytes, and SDPA's attention backends, alone;
* ``moe-text-b32``: the MoE routers' balance trained on tinyshakespeare's BPE tokens, 400 steps
  per (bias step, seed), every step's loads kept (worst and median layer, summed and per step).

    $ python benchmarks/pretrain_gpu.py --budget-s 1500       # the default variants (~20 min on an H100)
    $ python benchmarks/pretrain_gpu.py --only micro,nanogpt-b32,dense-b32-fused-bf16res,moe-text-b32
    $ python benchmarks/pretrain_gpu.py --budget-s 170 --only nanogpt-b32,dense-b32-fused-bf16res,dense-b32-fused-bf16res-twosweep
    $ python benchmarks/pretrain_gpu.py --quick               # tiny shapes, CPU smoke test

Results: benchmarks/results/pretrain_gpu.{json,md} (or --out DIR); docs/performance.md
records every variant tried, with its prediction.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
VOCAB = 50304  # GPT-2's 50257 rounded up to a multiple of 128, as nanoGPT does
CONTEXT = 1024

# name -> settings; the driver runs them in this order (most important first)
VARIANTS: dict[str, dict] = {
    "nanogpt-b32": dict(model="nanogpt", batch=32),
    # third session: the Triton cross-entropy kernel (dsk.models.ce_kernel) is the fused loss's default;
    # "-oldce" is the compiled PyTorch expression it replaced, in the same call
    "dense-b32-fused-bf16res-oldce": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                          triton_ce=False),
    # fourth session: the one-pass loss kernel (gradient = r * p), inductor's tuning modes on top
    "dense-b32-fused-bf16res-onepass": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                            loss_kernel="onepass"),
    # the two-sweep kernel (with eviction hints), the default until the fourth session's calls
    "dense-b32-fused-bf16res-twosweep": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                             loss_kernel="twosweep"),
    "dense-b32-fused-onepass": dict(model="dsk", preset="gpt2", batch=32, fused=True, loss_kernel="onepass"),
    "dense-b32-fused-bf16res-onepass-cdt": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                                loss_kernel="onepass", inductor={"coordinate_descent_tuning": True}),
    "dense-b32-fused-bf16res-onepass-maxat": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                                  loss_kernel="onepass", compile_mode="max-autotune-no-cudagraphs"),
    # session 6: the clip factor inside the fused AdamW kernel (what the trainer does now), CUDA graphs
    "dense-b32-fused-bf16res-fold": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16", clip="fold"),
    "dense-b32-fused-bf16res-fold-graphs": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                                clip="fold", compile_mode="reduce-overhead"),
    # the trainer's last log interval starts from an empty launch queue (after the interval's loss read):
    # 30 steps per interval instead of 10 make that start a third as large a share
    "trainer-dense-b32-bf16res-graphs-long": dict(model="trainer", preset="gpt2", batch=32, residual="bf16",
                                                  compile_mode="reduce-overhead", steps=90, log_every=30),
    "trainer-dense-b32-bf16res-graphs": dict(model="trainer", preset="gpt2", batch=32, residual="bf16",
                                             compile_mode="reduce-overhead"),
    "dense-b64-fused-bf16res-fold": dict(model="dsk", preset="gpt2", batch=64, fused=True, residual="bf16", clip="fold"),
    "micro-ce4": dict(model="micro", batch=32, attention=False, whole_rows=False, round=4),
    "dense-b32-fused-bf16res-flash": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                          sdpa="flash"),
    # kernels alone: the cross-entropy candidates against the compiled expression and a copy, SDPA backends
    "micro": dict(model="micro", batch=32),
    "micro-ce": dict(model="micro", batch=32, attention=False, whole_rows=False),
    # router balance on real text (BPE tokens of tinyshakespeare), several hundred steps, several seeds
    "moe-text-b32": dict(model="balance", preset="gpt2-moe", batch=32, fused=True, steps=400,
                         settings=[dict(gamma=0.003, seq_aux_alpha=0.001), dict(gamma=0.001, seq_aux_alpha=0.001)],
                         seeds=[0, 1]),
    "dense-b32": dict(model="dsk", preset="gpt2", batch=32),
    # Transformer.use_fused(): one GEMM for q|k|v and w1|w3, the LM head fused with the loss
    "dense-b32-fused": dict(model="dsk", preset="gpt2", batch=32, fused=True),
    "dense-b32-fused-bf16res": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16"),
    # MoE at batch 64, then the router-balancing settings on the same compiled model (balance=...)
    "moe-b64-fused": dict(model="dsk", preset="gpt2-moe", batch=64, fused=True, balance=True),
    "dense-b64-fused": dict(model="dsk", preset="gpt2", batch=64, fused=True),
    "nanogpt-b64": dict(model="nanogpt", batch=64),
    "dense-b32-fused-cdt": dict(model="dsk", preset="gpt2", batch=32, fused=True, inductor={"coordinate_descent_tuning": True}),
    # second call: the bf16 residual stream with everything else, at both batches; MoE likewise
    "dense-b64-fused-bf16res": dict(model="dsk", preset="gpt2", batch=64, fused=True, residual="bf16"),
    "dense-b32-fused-bf16res-cdt": dict(model="dsk", preset="gpt2", batch=32, fused=True, residual="bf16",
                                        inductor={"coordinate_descent_tuning": True}),
    "dense-b32-fusedloss-bf16res": dict(model="dsk", preset="gpt2", batch=32, fused="loss", residual="bf16"),
    "trainer-dense-b32-bf16res": dict(model="trainer", preset="gpt2", batch=32, residual="bf16"),
    "moe-b64-fused-bf16res": dict(model="dsk", preset="gpt2-moe", batch=64, fused=True, residual="bf16", balance=True),
    "moe-b32-fused": dict(model="dsk", preset="gpt2-moe", batch=32, fused=True),
    "dense-b32-fusedloss": dict(model="dsk", preset="gpt2", batch=32, fused="loss"),
    "trainer-dense-b32": dict(model="trainer", preset="gpt2", batch=32),
    "dense-b32-fused-maxautotune": dict(model="dsk", preset="gpt2", batch=32, fused=True,
                                        compile_mode="max-autotune-no-cudagraphs"),
    # the variants of the first session (docs/performance.md)
    "moe-b32": dict(model="dsk", preset="gpt2-moe", batch=32),
    "dense-b32-cudnn": dict(model="dsk", preset="gpt2", batch=32, sdpa="cudnn"),
    "moe-b32-cudnn": dict(model="dsk", preset="gpt2-moe", batch=32, sdpa="cudnn"),
    "dense-b64-cudnn": dict(model="dsk", preset="gpt2", batch=64, sdpa="cudnn"),
    "moe-b64-cudnn": dict(model="dsk", preset="gpt2-moe", batch=64, sdpa="cudnn"),
    "moe-b32-loop-eager": dict(model="dsk", preset="gpt2-moe", batch=32, moe="loop", compile=False, steps=8),
    "nanogpt-b32-cudnn": dict(model="nanogpt", batch=32, sdpa="cudnn"),
}
# the default run: the anchors at both batches, the plain and the fast paths, the trainer, the MoE with its
# balance settings, then the attribution variants (the first session's stay selectable with --only)
DEFAULT = ["micro-ce4", "nanogpt-b32", "dense-b32-fused-bf16res", "dense-b32-fused-bf16res-twosweep", "dense-b32-fused",
           "moe-text-b32", "dense-b32-fused-bf16res-flash", "nanogpt-b64", "dense-b64-fused-bf16res",
           "trainer-dense-b32-bf16res", "dense-b32-fused-maxautotune"]

# router-balancing settings measured on one compiled MoE model (variants with balance=True):
# bias step (DeepSeek-V3's sign rule), warm-up steps before the 25 measured ones, data
BALANCE = [
    # bias += gamma * (mean - load) / mean: steps shrink as the load evens out
    dict(gamma=0.005, warmup=120, data="random", rule="proportional"),
    # plus DeepSeek-V3's sequence-wise balance loss (a recompile: it changes the forward)
    dict(gamma=0.003, warmup=120, data="random", seq_aux_alpha=0.001),
    dict(gamma=0.003, warmup=120, data="random", seq_aux_alpha=0.01),
]
# the first call's settings (docs/performance.md): gamma 0.01 / 30 and 120 warm-up steps, 0.003, 0.001,
# proportional 0.02, text bytes


# =========================================================================== the anchor


class NanoBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.attn_proj = nn.Linear(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.c_fc = nn.Linear(d, 4 * d)
        self.mlp_proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """GPT-2 124M as nanoGPT builds it (dropout 0, biases on, tied head, init 0.02)."""

    def __init__(self, n_layer=12, n_head=12, d=768, vocab=VOCAB, context=CONTEXT):
        super().__init__()
        self.wte = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(context, d)
        self.h = nn.ModuleList(NanoBlock(d, n_head) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.ndim >= 2:
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
        self.n_layer, self.n_head, self.d = n_layer, n_head, d

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def matmul_params(self) -> int:
        return sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()

    def optimizer(self, lr: float, fused: bool) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), fused=fused)


# =========================================================================== measurement


def matmul_tflops(device: str, n: int = 8192, reps: int = 20) -> float:
    """bf16 n^3 matrix product rate on random data, median of ``reps`` event-timed products."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return 2 * n**3 / times[len(times) // 2] / 1e12


def sdpa_context(name: str | None):
    if not name:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
               "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]
    return sdpa_kernel([backend])


class RandomTokens:
    """A few pinned host batches of random token ids, cycled; copied with non_blocking=True."""

    def __init__(self, batch: int, context: int, vocab: int, device: str, pool: int = 4, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        blocks = [torch.randint(0, vocab, (batch, context + 1), generator=g) for _ in range(pool)]
        self.pool = [(b[:, :-1].contiguous(), b[:, 1:].contiguous()) for b in blocks]
        if device == "cuda":
            self.pool = [(x.pin_memory(), y.pin_memory()) for x, y in self.pool]
        self.device, self.batch_size, self.context = device, batch, context

    def get(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.pool[step % len(self.pool)]
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    # the trainer's data interface (dsk.train.data.TokenData)
    def batch(self, step: int, micro: int = 0):
        return self.get(step)

    def val_batches(self):
        yield self.get(0)

    def bits_per_byte(self, loss: float) -> float:
        return loss / math.log(2)


def dsk_model(preset: str, context: int, vocab: int, quick: bool):
    from dsk.models import ModelConfig, Transformer

    over = dict(vocab_size=vocab, max_seq_len=context)
    if quick:
        over.update(dim=64, n_layers=2, n_heads=4, inter_dim=128, moe_inter_dim=64,
                    n_dense_layers=1 if preset.endswith("moe") else 2)
    cfg = ModelConfig.preset(preset, **over)
    model = Transformer(cfg)
    n = model.num_params(active=True) - (0 if cfg.tie_embeddings else model.embed.weight.numel())
    return model, cfg, n


def measure(name: str, v: dict, *, quick: bool, out_dir: Path) -> dict:
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    batch, context, vocab = v["batch"], CONTEXT, VOCAB
    if quick:
        batch, context, vocab = 2, 64, 512
    steps = 4 if quick else v.get("steps", 25)
    # MoE: 120 steps before timing, so the routers' bias balancing has settled (docs/performance.md)
    warmup = 2 if quick else v.get("warmup", 120 if v.get("preset", "").endswith("moe") else 6)
    compile_ = v.get("compile", True) and not quick
    for key, value in v.get("inductor", {}).items():
        setattr(torch._inductor.config, key, value)
    compile_kw = {"mode": v["compile_mode"]} if v.get("compile_mode") else {}
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    row: dict = {"variant": name, **v, "batch": batch, "context": context, "vocab": vocab, "device": device}

    if v["model"] == "trainer":
        return row | measure_trainer(v, batch, context, vocab, device, quick, compile_, out_dir)
    if v["model"] == "micro":
        return row | (measure_micro(quick, v.get("attention", True), v.get("whole_rows", True), v.get("round", 3))
                      if device == "cuda"
                      else {"skipped": "needs CUDA"})
    if v.get("triton_ce") is False:
        import dsk.models.model as M

        M.triton_cross_entropy = False
    if v.get("loss_kernel"):  # the fused head's loss kernel (dsk.models.model.cross_entropy_onepass)
        import dsk.models.model as M

        M.cross_entropy_onepass = v["loss_kernel"] == "onepass"
    if v["model"] == "balance":
        return row | measure_balance(v, batch, context, vocab, device, quick, compile_)

    if v["model"] == "nanogpt":
        model = NanoGPT(vocab=vocab, context=context, **({"n_layer": 2, "n_head": 4, "d": 64} if quick else {}))
        model.to(device)
        n_params, layers, width = model.matmul_params(), model.n_layer, model.d
        optimizer = model.optimizer(6e-4, fused=device == "cuda")
        fwd = torch.compile(model, **compile_kw) if compile_ else model

        def loss_of(x, y):
            return fwd(x, y)
        moe = False
    else:
        from dsk.train.optim import make_optimizer

        model, cfg, n_params = dsk_model(v["preset"], context, vocab, quick)
        model.to(device).train()
        layers, width = cfg.n_layers, cfg.n_heads * cfg.head_dim
        optimizer = make_optimizer(model, name="adamw", lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
        moe = cfg.is_moe
        if v.get("moe") == "loop":
            import dsk.models.model as M

            M.use_grouped_mm = lambda x: None
        elif moe and device == "cuda":
            row["grouped_vs_loop_rel_err"] = check_grouped(model, cfg, device)
        if v.get("fused"):
            model.use_fused(v["fused"] is True)
            model.fused_loss = True
        if v.get("residual") == "bf16":
            model.residual_dtype = torch.bfloat16
        if v.get("fused") and device == "cuda":
            row["fused_vs_plain"] = check_fused(model, v["fused"] is True, device)
        fwd = torch.compile(model, **compile_kw) if compile_ else model

        def loss_of(x, y):
            return fwd(x, targets=y).loss
    row["matmul_params"] = n_params
    row["total_params"] = sum(p.numel() for p in model.parameters())
    # 6 N per token for the weights, plus attention's QK^T and AV: 6 * 2 * L * width * T (full, not causal)
    flops_per_token = 6 * n_params + 12 * layers * width * context
    row["flops_per_token"] = flops_per_token

    params = [p for p in model.parameters() if p.requires_grad]
    data = RandomTokens(batch, context, vocab, device)
    loads: dict[int, torch.Tensor] = {}
    per_step: dict[int, list[torch.Tensor]] = {}  # each timed step's loads, read after the timing
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def event():
        if device != "cuda":
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    state = {"data": data, "optimizer": optimizer}  # balance_runs swaps them
    clip_fold = v.get("clip") == "fold"
    graphs = compile_ and v.get("compile_mode") == "reduce-overhead"
    if clip_fold:
        from dsk.train.optim import clip_and_step

    def step(i: int, marks: list | None = None, prof=None):
        rf = torch.profiler.record_function if prof is not None else (lambda _n: contextlib.nullcontext())
        data, optimizer = state["data"], state["optimizer"]
        if graphs:  # CUDA graph trees: this step's outputs may overwrite the last step's
            torch.compiler.cudagraph_mark_step_begin()
        x, y = data.get(i)
        m0 = event()
        with rf("forward"), autocast:
            loss = loss_of(x, y)
        m1 = event()
        with rf("backward"):
            loss.backward()
        m2 = event()
        with rf("optimizer"):
            if clip_fold:  # what `dsk pretrain` does (dsk.train.optim.clip_and_step)
                clip_and_step(optimizer, params, 1.0)
            else:
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if moe:
                for layer, load in model.update_router_bias().items():
                    loads[layer] = loads.get(layer, 0) + load
                    per_step.setdefault(layer, []).append(load)
        m3 = event()
        if marks is not None:
            marks.append((m0, m1, m2, m3))
        return loss
    step.state = state

    with sdpa_context(v.get("sdpa") if device == "cuda" else None):
        t0 = time.perf_counter()
        for i in range(warmup):
            loss = step(i)
        sync()
        row["warmup_s"] = round(time.perf_counter() - t0, 1)
        loads.clear()
        per_step.clear()
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        marks: list = []
        start = event()
        host_start = time.perf_counter()
        for i in range(steps):
            loss = step(warmup + i, marks)
        # the host's time to issue the steps: near step_ms means the GPU waited for Python
        row["host_ms_per_step"] = round((time.perf_counter() - host_start) / steps * 1e3, 2)
        end = event()
        sync()
        elapsed = (start.elapsed_time(end) / 1e3) if device == "cuda" else end - start
        row["loss_end"] = round(float(loss), 4)
        row["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2) if device == "cuda" else None

        def span(a, b):
            return a.elapsed_time(b) if device == "cuda" else (b - a) * 1e3
        for k, label in enumerate(("forward_ms", "backward_ms", "optimizer_ms")):
            vals = sorted(span(m[k], m[k + 1]) for m in marks)
            row[label] = round(vals[len(vals) // 2], 2)
        row["step_ms"] = round(elapsed / steps * 1e3, 2)
        row["tokens_per_s"] = round(batch * context * steps / elapsed)
        row["model_tflops"] = round(flops_per_token * row["tokens_per_s"] / 1e12, 1)
        if moe and loads:
            row.update(balance_stats(loads, per_step))
        row["profile"], row["profile_table"] = profile_steps(step, warmup + steps, device)
        if moe and v.get("balance"):
            row["balance_runs"] = balance_runs(model, cfg, step, loads, per_step, batch, context, vocab, device,
                                               quick, n_params, layers, width)
    return row


def balance_stats(loads: dict, per_step: dict) -> dict:
    """Expert load max/mean per layer: of the loads summed over the timed steps, and of each step's
    loads averaged over the steps (the stricter one); the worst layer of each."""
    summed = {i: float(l.max()) / max(float(l.float().mean()), 1e-9) for i, l in loads.items()}
    stepwise = {}
    for i, ls in per_step.items():
        s = torch.stack([t.float() for t in ls])  # [steps, E]
        stepwise[i] = float((s.max(dim=1).values / s.mean(dim=1).clamp(min=1e-9)).mean())
    return {"expert_load_max_over_mean": round(max(summed.values()), 3),
            "expert_load_max_over_mean_by_layer": {str(i): round(r, 3) for i, r in summed.items()},
            "expert_load_max_over_mean_stepwise": round(max(stepwise.values()), 3) if stepwise else None,
            "expert_load_max_over_mean_stepwise_by_layer": {str(i): round(r, 3) for i, r in stepwise.items()}}


def text_tokens(batch: int, context: int, device: str):
    """tinyshakespeare's bytes as token ids (real text: routers see varied inputs), pinned host batches."""
    here = [REPO / "data" / "sample" / "tinyshakespeare.txt", Path.cwd() / "data" / "sample" / "tinyshakespeare.txt"]
    raw = torch.frombuffer(bytearray(next(p for p in here if p.exists()).read_bytes()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)
    data = RandomTokens(batch, context, 2, device)
    pool = []
    for _ in range(8):
        starts = torch.randint(0, len(raw) - context - 1, (batch,), generator=g)
        block = torch.stack([raw[s : s + context + 1] for s in starts.tolist()])
        x, y = block[:, :-1].contiguous(), block[:, 1:].contiguous()
        pool.append((x.pin_memory(), y.pin_memory()) if device == "cuda" else (x, y))
    data.pool = pool
    return data


def balance_runs(model, cfg, step, loads, per_step, batch, context, vocab, device, quick, n_params, layers, width):
    """Re-initialise the same compiled MoE model for each BALANCE setting, train it ``warmup``
    steps, then measure 25 steps: expert load max/mean and tokens/s at the same time."""
    from dsk.train.optim import make_optimizer

    out = []
    steps = 4 if quick else 25
    for b in BALANCE:
        torch.manual_seed(0)
        with torch.no_grad():
            model.reset_parameters()
        for moe in model.moe_layers().values():
            moe.load.zero_()
        model.cfg.bias_update_speed = b["gamma"]
        model.cfg.seq_aux_alpha = b.get("seq_aux_alpha", 0.0)
        for gate in (moe.gate for moe in model.moe_layers().values()):
            if b.get("rule") == "proportional":
                gate.update_bias = proportional_update.__get__(gate)
            else:
                gate.__dict__.pop("update_bias", None)
        data = text_tokens(batch, context, device) if b["data"] == "text" else RandomTokens(batch, context, vocab, device, seed=1)
        step.state["data"] = data
        step.state["optimizer"] = make_optimizer(model, name="adamw", lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95),
                                                 device=device)
        warmup = 2 if quick else b["warmup"]
        for i in range(warmup):
            step(i)
        loads.clear()
        per_step.clear()
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            loss = step(warmup + i)
        lv = float(loss)
        dt_s = time.perf_counter() - t0
        tps = batch * context * steps / dt_s
        res = dict(b, tokens_per_s=round(tps), model_tflops=round((6 * n_params + 12 * layers * width * context) * tps / 1e12, 1),
                   loss_end=round(lv, 4), **balance_stats(loads, per_step))
        print("balance", json.dumps({k: res.get(k) for k in ("gamma", "rule", "seq_aux_alpha", "warmup", "data", "tokens_per_s",
                                                        "expert_load_max_over_mean",
                                                        "expert_load_max_over_mean_stepwise")}), flush=True)
        out.append(res)
    return out


@torch.no_grad()
def proportional_update(gate, load: torch.Tensor, speed: float) -> None:
    load = load.float()
    gate.bias += speed * (load.mean() - load) / load.mean().clamp(min=1.0)


def check_fused(model, projections: bool, device: str) -> dict:
    """Loss and gradient of the fused paths against the plain ones on one bf16 batch (eager)."""
    torch.manual_seed(1)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 1024 if model.cfg.max_seq_len >= 1024 else 64), device=device)
    res = {}
    grads = []
    for fused in (False, True):
        model.use_fused(fused and projections)
        model.fused_loss = fused
        with torch.autocast(device_type=device, dtype=torch.bfloat16):
            loss = model(idx, targets=idx).loss
        loss.backward()
        res["loss_fused" if fused else "loss_plain"] = round(float(loss), 5)
        grads.append(torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None]))
        model.zero_grad(set_to_none=True)
    for moe in model.moe_layers().values():
        moe.load.zero_()
    res["grad_rel_err"] = round(float((grads[1] - grads[0]).norm() / grads[0].norm()), 5)
    model.use_fused(projections)
    model.fused_loss = True
    return res


def check_grouped(model, cfg, device: str) -> float:
    """Relative error of the grouped-matmul MoE layer against the per-expert loop, bf16 autocast."""
    import dsk.models.model as M

    layer = model.layers[cfg.n_dense_layers].ffn
    x = torch.randn(2, 512, cfg.dim, device=device)
    with torch.no_grad(), torch.autocast(device_type=device, dtype=torch.bfloat16):
        fast = layer(x)[0].float()
        keep, M.use_grouped_mm = M.use_grouped_mm, (lambda t: None)
        try:
            slow = layer(x)[0].float()
        finally:
            M.use_grouped_mm = keep
    layer.load.zero_()
    return round(float((fast - slow).norm() / slow.norm()), 5)


# =========================================================================== third session: kernels, balance


def _bench_ms(fn, reps_ms: int = 200) -> float:
    """Median milliseconds of ``fn`` (CUDA events, after warm-up)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=25, rep=reps_ms, return_mode="median"))


def measure_micro(quick: bool, attention: bool = True, whole_rows: bool = True, round_: int = 3) -> dict:
    """The loss kernel's candidates on GPT-2-sized logits, and attention's backends, alone.

    Cross-entropy rows: bf16 logits [32768, 50304] (batch 32 x 1024), random targets, 1/5 of
    the rows ignored; each candidate returns the per-row loss and the bf16 gradient, checked
    against the compiled PyTorch expression that the fused head used before (docs/performance.md).
    The floor is one read and one write of the logits: timed as a device copy of the same bytes.
    """
    import triton
    import triton.language as tl

    import dsk.models.ce_kernel as K

    N, V = (256, 1000) if quick else (32768, VOCAB)
    torch.manual_seed(0)
    out: dict = {"ce_shape": [N, V]}
    x = (3 * torch.randn(N, V, device="cuda")).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda")
    t[torch.rand(N, device="cuda") < 0.2] = -100
    inv = (1.0 / (t != -100).sum().float()).reshape(1)
    y = torch.empty_like(x)
    copy_ms = _bench_ms(lambda: y.copy_(x))
    out["copy_ms"] = round(copy_ms, 3)
    out["copy_tb_s"] = round(2 * x.numel() * 2 / copy_ms / 1e9, 2)
    cols = torch.arange(V, device="cuda")

    @torch.compile
    def reference(logits, targets, inv_count):
        lf = logits.float()
        lse = torch.logsumexp(lf, dim=-1)
        valid = targets != -100
        target_logit = lf.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
        loss = torch.where(valid, lse - target_logit, 0.0)
        scale = valid.float() * inv_count
        g = ((torch.exp(lf - lse[:, None]) - (cols == targets[:, None]).float()) * scale[:, None]).to(logits.dtype)
        return loss, g

    ref_loss, ref_g = reference(x, t, inv)
    exact_loss, exact_g = ref_loss.float(), ref_g.float()
    rows = [{"kernel": "compiled torch (before)", "ms": round(_bench_ms(lambda: reference(x, t, inv)), 3)}]

    @triton.jit
    def whole_row(x_ptr, g_ptr, t_ptr, loss_ptr, scale_ptr, stride, V, BLOCK: tl.constexpr):
        # the row held in registers: one read from memory by construction (spills permitting)
        row = tl.program_id(0).to(tl.int64)
        cols_ = tl.arange(0, BLOCK)
        mask = cols_ < V
        xv = tl.load(x_ptr + row * stride + cols_, mask=mask, other=float("-inf")).to(tl.float32)
        tv = tl.load(t_ptr + row)
        m = tl.max(xv, 0)
        e = tl.exp(xv - m)
        s = tl.sum(e, 0)
        lse = m + tl.log(s)
        valid = tv != -100
        xt = tl.sum(tl.where(cols_ == tv, xv, 0.0), 0)
        tl.store(loss_ptr + row, tl.where(valid, lse - xt, 0.0))
        scale = tl.where(valid, tl.load(scale_ptr), 0.0)
        g = (e / s - tl.where(cols_ == tv, 1.0, 0.0)) * scale
        tl.store(g_ptr + row * stride + cols_, g.to(tl.bfloat16), mask=mask)

    def check(loss, g):
        return (float((loss.float() - exact_loss).norm() / exact_loss.norm()),
                float((g.float() - exact_g).norm() / exact_g.norm()))

    # (BLOCK, warps, per-lane running statistics in sweep 1, sweep 2 reversed): dsk.models.ce_kernel
    candidates = [(4096, 8, 0, 0), (8192, 8, 0, 0), (4096, 8, 1, 0), (4096, 8, 0, 1), (4096, 8, 1, 1),
                  (8192, 8, 1, 1), (8192, 16, 1, 1), (2048, 4, 1, 1), (16384, 16, 1, 1)]
    if round_ >= 4:  # fourth session: the current default, and with L2 eviction hints (EVICT)
        # (call 1 also ran 16384 / 16 and 32 warps with hints: 3.62, 3.63 ms)
        candidates = [(8192, 16, 1, 1), (8192, 16, 1, 1, 1), (4096, 8, 1, 1, 1), (2048, 4, 1, 1, 1),
                      (4096, 4, 1, 1, 1), (8192, 8, 1, 1, 1)]
    for b, w, lanes, rev, *ev in candidates:
        ev = ev[0] if ev else 0
        loss = torch.full((N,), float("nan"), device="cuda")
        g = torch.full_like(x, float("nan"))

        def run(loss=loss, g=g, b=b, w=w, lanes=lanes, rev=rev):
            K._ce_rows[(N,)](x, g, t, loss, inv, x.stride(0), g.stride(0), V, -100, BLOCK=b, LANES=lanes, REVERSE=rev,
                             EVICT=ev, num_warps=w)
        name = (f"two sweeps BLOCK={b} warps={w}" + (" per-lane stats" if lanes else "") + (" reversed" if rev else "")
                + (" evict hints" if ev else ""))
        try:
            run()
            lerr, gerr = check(loss, g)
            rows.append({"kernel": name, "ms": round(_bench_ms(run), 3), "loss_rel_err": lerr, "grad_rel_err": gerr,
                         "nan_left": bool(torch.isnan(g).any() or torch.isnan(loss).any())})
        except Exception as exc:  # a config the compiler rejects is a result too
            rows.append({"kernel": name, "error": str(exc)[:200]})
    block = triton.next_power_of_2(V)
    for w in ((16, 32) if whole_rows else ()):
        loss = torch.full((N,), float("nan"), device="cuda")
        g = torch.full_like(x, float("nan"))

        def run(loss=loss, g=g, w=w):
            whole_row[(N,)](x, g, t, loss, inv, x.stride(0), V, BLOCK=block, num_warps=w)
        try:
            run()
            lerr, gerr = check(loss, g)
            rows.append({"kernel": f"whole row in registers BLOCK={block} warps={w}", "ms": round(_bench_ms(run), 3),
                         "loss_rel_err": lerr, "grad_rel_err": gerr})
        except Exception as exc:
            rows.append({"kernel": f"whole row BLOCK={block} warps={w}", "error": str(exc)[:200]})
    if round_ >= 4:
        # the one-pass kernel: gradient = r * p (p = exp(x - x_target), p[t] = 1 - sum, r = scale / sum)
        # call 1 (target column masked out of the vector stores) ran (2048, 4), (4096, 4), (8192, 8), (16384, 16)
        # without hints too: 7.2-7.3 ms
        for b, w, ev in ((4096, 8, 1), (8192, 16, 1), (2048, 4, 1), (4096, 4, 1), (8192, 8, 1), (4096, 8, 0)):
            loss = torch.full((N,), float("nan"), device="cuda")
            p = torch.full_like(x, float("nan"))
            r = torch.full((N,), float("nan"), device="cuda")

            def run(loss=loss, p=p, r=r, b=b, w=w, ev=ev):
                K._ce_onepass[(N,)](x, p, t, loss, r, inv, x.stride(0), p.stride(0), V, -100, LIMIT=K.ONEPASS_LIMIT,
                                    BLOCK=b, EVICT=ev, num_warps=w)
            name = f"one pass BLOCK={b} warps={w}" + (" evict hints" if ev else "")
            try:
                run()
                lerr, gerr = check(loss, r[:, None] * p.float())
                rows.append({"kernel": name, "ms": round(_bench_ms(run), 3), "loss_rel_err": lerr, "grad_rel_err": gerr,
                             "nan_left": bool(torch.isnan(p).any() or torch.isnan(loss).any())})
            except Exception as exc:
                rows.append({"kernel": name, "error": str(exc)[:200]})
        loss, p, r = K.cross_entropy_rows_onepass(x, t, inv, -100)
        lerr, gerr = check(loss, r[:, None] * p.float())
        rows.append({"kernel": f"dsk::cross_entropy_rows_onepass (autotuned: {K._ce_onepass_kernel.best_config})",
                     "ms": round(_bench_ms(lambda: K.cross_entropy_rows_onepass(x, t, inv, -100)), 3),
                     "loss_rel_err": lerr, "grad_rel_err": gerr})
        del p
        out["head"] = measure_head(quick)
    # the op as the model calls it (autotuned over ce_kernel's configs on the first call)
    loss, g = K.cross_entropy_rows(x, t, inv, -100)
    lerr, gerr = check(loss, g)
    rows.append({"kernel": f"dsk::cross_entropy_rows (autotuned: {K._ce_rows_kernel.best_config})",
                 "ms": round(_bench_ms(lambda: K.cross_entropy_rows(x, t, inv, -100)), 3),
                 "loss_rel_err": lerr, "grad_rel_err": gerr})
    out["ce"] = rows
    del x, y, g, ref_g, exact_g
    torch.cuda.empty_cache()
    if not attention:
        return out

    # attention, fwd + bwd, [32, 12, 1024, 64] causal, q/k/v as the model lays them out ([B, T, H, D] viewed)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    B, H, T, D = (2, 4, 128, 64) if quick else (32, 12, CONTEXT, 64)
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
               for _ in range(3))
    go = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16)
    flops = 4 * B * H * T * T * D / 2 * 3.5  # causal; backward = 2.5 x forward
    att = []
    ref_out = None
    for name, be in (("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION),
                     ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        def fb(be=be):
            with sdpa_kernel([be]):
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return o, torch.autograd.grad(o, (q, k, v), go)
        try:
            o, _ = fb()
            ref_out = o.float() if ref_out is None else ref_out
            err = float((o.float() - ref_out).norm() / ref_out.norm())
            with sdpa_kernel([be]):
                fwd_ms = _bench_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            ms = _bench_ms(fb)
            att.append({"backend": name, "fwd_bwd_ms": round(ms, 3), "fwd_ms": round(fwd_ms, 3),
                        "tflops": round(flops / ms / 1e9, 1), "rel_err_vs_cudnn": err})
        except Exception as exc:
            att.append({"backend": name, "error": str(exc)[:200]})
    out["attention"] = att
    return out


def measure_head(quick: bool) -> list[dict]:
    """The whole fused head (LM-head GEMM, loss kernel, both gradient GEMMs, backward scaling), compiled,
    forward + backward, at batch 32 x 1024 x 768: the two-sweep kernel against the one-pass one."""
    import dsk.models.model as M

    N, D, V = (256, 64, 1000) if quick else (32768, 768, VOCAB)
    torch.manual_seed(0)
    h = torch.randn(N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (0.02 * torch.randn(V, D, device="cuda")).requires_grad_()
    t = torch.randint(0, V, (N,), device="cuda")
    out, ref, keep = [], None, M.cross_entropy_onepass
    for onepass in (False, True):
        M.cross_entropy_onepass = onepass
        torch._dynamo.reset()
        f = torch.compile(lambda h, w, t: M.head_cross_entropy(h, w, t, dtype=torch.bfloat16))

        def fb():
            h.grad = w.grad = None
            loss = f(h, w, t)
            loss.backward()
            return loss
        try:
            loss = fb()
            grads = (loss.detach().float(), h.grad.float(), w.grad.float())
            ref = grads if ref is None else ref
            errs = [float((a - b).norm() / b.norm()) for a, b in zip(grads, ref)]
            out.append({"head": "one pass" if onepass else "two sweeps", "fwd_bwd_ms": round(_bench_ms(fb), 3),
                        "loss_rel_err": errs[0], "grad_h_rel_err": errs[1], "grad_w_rel_err": errs[2]})
        except Exception as exc:
            out.append({"head": "one pass" if onepass else "two sweeps", "error": str(exc)[:300]})
    M.cross_entropy_onepass = keep
    return out


def bpe_tokens(quick: bool) -> torch.Tensor:
    """tinyshakespeare as the project's byte-level BPE tokens (8192-word vocabulary trained on it)."""
    from dsk.data.tokenizer import Tokenizer, train_bpe

    here = [REPO / "data" / "sample" / "tinyshakespeare.txt", Path.cwd() / "data" / "sample" / "tinyshakespeare.txt"]
    text = next(p for p in here if p.exists()).read_text()
    if quick:
        text = text[:200_000]
    tok = Tokenizer(train_bpe(text.split("\n\n"), vocab_size=512 if quick else 8192))
    return torch.tensor(tok.encode(text), dtype=torch.long)


def measure_balance(v: dict, batch: int, context: int, vocab: int, device: str, quick: bool, compile_: bool) -> dict:
    """Expert load of ``gpt2-moe`` trained on real text: ``steps`` steps per (setting, seed), the
    same compiled model re-initialised for each; every step's per-layer loads are kept (on the
    device, read once at the end) and summarised over the last half of the run."""
    from dsk.train.optim import make_optimizer

    tokens = bpe_tokens(quick)
    model, cfg, n_params = dsk_model(v["preset"], context, vocab, quick)
    model.to(device).train()
    model.use_fused(True)
    if v.get("residual") == "bf16":
        model.residual_dtype = torch.bfloat16
    fwd = torch.compile(model) if compile_ else model
    params = [p for p in model.parameters() if p.requires_grad]
    autocast = torch.autocast(device_type=device, dtype=torch.bfloat16)
    moe_ids = sorted(model.moe_layers())
    steps = 12 if quick else v["steps"]
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * context
    offsets = torch.arange(context + 1)
    out = {"tokens": int(tokens.numel()), "steps": steps, "runs": []}
    for setting in v["settings"]:
        for seed in v["seeds"]:
            torch.manual_seed(seed)
            with torch.no_grad():
                model.reset_parameters()
            for moe in model.moe_layers().values():
                moe.load.zero_()
            cfg.bias_update_speed, cfg.seq_aux_alpha = setting["gamma"], setting["seq_aux_alpha"]
            opt = make_optimizer(model, name="adamw", lr=6e-4, weight_decay=0.1, betas=(0.9, 0.95), device=device)
            gen = torch.Generator().manual_seed(seed)
            loads = torch.zeros(steps, len(moe_ids), cfg.n_routed_experts, device=device)
            losses = torch.zeros(steps, device=device)
            t0 = time.perf_counter()
            t_half = None
            for i in range(steps):
                if i == steps // 2:
                    if device == "cuda":
                        torch.cuda.synchronize()
                    t_half = time.perf_counter()
                starts = torch.randint(0, tokens.numel() - context - 1, (batch,), generator=gen)
                block = tokens[starts[:, None] + offsets]
                if device == "cuda":
                    block = block.pin_memory()
                x = block[:, :-1].to(device, non_blocking=True)
                y = block[:, 1:].to(device, non_blocking=True)
                try:
                    with autocast:
                        loss = fwd(x, targets=y).loss
                    loss.backward()
                except Exception as exc:  # keep the balance measurement if the loss kernel fails to build
                    if "ce_kernel_error" in out:
                        raise
                    import dsk.models.model as M

                    out["ce_kernel_error"] = str(exc)[:300]
                    M.triton_cross_entropy = False
                    torch._dynamo.reset()
                    fwd = torch.compile(model) if compile_ else model
                    opt.zero_grad(set_to_none=True)
                    with autocast:
                        loss = fwd(x, targets=y).loss
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step_loads = model.update_router_bias()
                loads[i] = torch.stack([step_loads[j].float() for j in moe_ids])
                losses[i] = loss.detach()
            if device == "cuda":
                torch.cuda.synchronize()
            t1 = time.perf_counter()
            tps_half = batch * context * (steps - steps // 2) / (t1 - t_half)
            out["runs"].append({"gamma": setting["gamma"], "seq_aux_alpha": setting["seq_aux_alpha"], "seed": seed,
                                "wall_s": round(t1 - t0, 1), "tokens_per_s_second_half": round(tps_half),
                                "model_tflops_second_half": round(flops_per_token * tps_half / 1e12, 1),
                                **load_summary(loads.cpu(), losses.cpu(), moe_ids)})
            r = out["runs"][-1]
            print("balance-text", json.dumps({k: r[k] for k in ("gamma", "seq_aux_alpha", "seed", "tokens_per_s_second_half",
                                                              "last_half", "loss_last_20")}), flush=True)
    out["matmul_params"] = n_params
    out["flops_per_token"] = flops_per_token
    out["tokens_per_s"] = int(sorted(r["tokens_per_s_second_half"] for r in out["runs"])[len(out["runs"]) // 2])
    return out


def load_summary(loads: torch.Tensor, losses: torch.Tensor, moe_ids: list[int]) -> dict:
    """loads [steps, layers, E]: max/mean of the loads summed over a window and of each step
    (averaged over the window), per layer; the worst and the median layer; in windows of a
    quarter of the run and over its last half."""
    steps = loads.shape[0]

    def window(a: int, b: int) -> dict:
        w = loads[a:b]
        summed = w.sum(0)
        summed_r = summed.max(-1).values / summed.mean(-1)          # [layers]
        per_step = (w.max(-1).values / w.mean(-1)).mean(0)          # [layers]
        med = lambda r: float(r.sort().values[(len(r) - 1) // 2])  # noqa: E731
        return {"steps": [a, b], "summed_worst": round(float(summed_r.max()), 3), "summed_median": round(med(summed_r), 3),
                "summed_worst_layer": moe_ids[int(summed_r.argmax())],
                "per_step_worst": round(float(per_step.max()), 3), "per_step_median": round(med(per_step), 3),
                "per_step_worst_layer": moe_ids[int(per_step.argmax())],
                "summed_by_layer": [round(float(r), 3) for r in summed_r],
                "per_step_by_layer": [round(float(r), 3) for r in per_step]}

    q = max(1, steps // 4)
    per_step_worst = (loads.max(-1).values / loads.mean(-1)).max(-1).values  # [steps]: worst layer each step
    return {"quarters": [window(a, min(a + q, steps)) for a in range(0, steps, q)],
            "last_half": window(steps // 2, steps),
            "per_step_worst_layer_trace": [round(float(r), 3) for r in per_step_worst],
            "loss_first_20": round(float(losses[:20].mean()), 4), "loss_last_20": round(float(losses[-20:].mean()), 4)}


def profile_steps(step, first: int, device: str, n: int = 3) -> tuple[dict, str]:
    """Device (or CPU) time of the forward / backward / optimizer ranges over ``n`` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(n):
            step(first + i, prof=True)
        if device == "cuda":
            torch.cuda.synchronize()
    out = {}
    for evt in prof.key_averages():
        if evt.key in ("forward", "backward", "optimizer"):
            dev_us = getattr(evt, "device_time_total", 0) or getattr(evt, "cuda_time_total", 0)
            out[evt.key] = {"device_ms_per_step": round(dev_us / 1e3 / n, 2),
                            "cpu_ms_per_step": round(evt.cpu_time_total / 1e3 / n, 2)}
    sort = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return out, prof.key_averages().table(sort_by=sort, row_limit=25)


def measure_trainer(v, batch, context, vocab, device, quick, compile_, out_dir: Path) -> dict:
    """The same dense model through dsk.train.train (the loop `dsk pretrain` runs): tokens/s of its last log interval."""
    import tempfile

    from dsk.train import TrainConfig, train

    model, cfg, n_params = dsk_model(v["preset"], context, vocab, quick)
    data = RandomTokens(batch, context, vocab, device)
    steps = 6 if quick else v.get("steps", 40)
    log_every = 2 if quick else v.get("log_every", steps // 4)
    tcfg = TrainConfig(max_steps=steps, batch_size=batch, lr=6e-4, warmup_steps=5, precision="bf16", device=device,
                       compile=compile_, eval_every=0, log_every=log_every,
                       checkpoint_every_minutes=0.0, bf16_residual=v.get("residual") == "bf16",
                       cuda_graphs=compile_ and v.get("compile_mode") == "reduce-overhead")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train(model, data, tcfg, run_dir=Path(tmp))
        wall = time.perf_counter() - t0
        timing = [json.loads(line) for line in (Path(tmp) / "timing.jsonl").read_text().splitlines()]
    train_rows = [t for t in timing if t["split"] == "train"]
    last = train_rows[-1]
    flops_per_token = 6 * n_params + 12 * cfg.n_layers * cfg.dim * context
    return {"matmul_params": n_params, "flops_per_token": flops_per_token, "tokens_per_s": round(last["tokens_per_s"]),
            "interval_tokens_per_s": [round(t["tokens_per_s"]) for t in train_rows],
            "model_tflops": round(flops_per_token * last["tokens_per_s"] / 1e12, 1), "wall_s": round(wall, 1),
            "loss_end": result.val_loss}


# =========================================================================== driver


def run_variant_subprocess(name: str, args, out_dir: Path, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--variant", name, "--out", str(out_dir)] + (["--quick"] if args.quick else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": name, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
        return {"variant": name, "error": f"exit {proc.returncode}: " + " | ".join(tail)[-800:]}
    return json.loads(lines[-1][len("RESULT "):])


def md_table(title: str, header: list[str], rows: list[list]) -> list[str]:
    """Markdown lines of a titled table (a blank line before and after the title)."""
    return (["", title, "", "| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
            + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows])


def markdown(meta: dict, rows: list[dict]) -> str:
    lines = [f"GPU training speed — {meta['gpu']}, torch {meta['torch']}, {meta['date']}; "
             f"bf16 matrix rate {meta['matmul_tflops']:.0f} TFLOP/s (8192^3, random data, same call)", "",
             "| variant | batch | tokens/s | MFU | vs nanoGPT b32 / its best batch | step ms | fwd / bwd / opt ms | peak GiB "
             "| load max/mean (summed; per-step) | notes |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | | | | | | | | failed: {r['error'][:120]} |")
            continue
        if "tokens_per_s" not in r or r.get("model") == "balance":
            continue  # kernels and router balance: their own tables below
        split = " / ".join(str(r.get(k, "")) for k in ("forward_ms", "backward_ms", "optimizer_ms"))
        note = f"grouped-vs-loop rel err {r['grouped_vs_loop_rel_err']}" if "grouped_vs_loop_rel_err" in r else ""
        if "fused_vs_plain" in r:
            note += f" fused vs plain: {r['fused_vs_plain']}"
        load = (f"{r['expert_load_max_over_mean']}; {r.get('expert_load_max_over_mean_stepwise')}"
                if r.get("expert_load_max_over_mean") else "")
        lines.append(
            f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:,} | {r.get('mfu', 0):.1%} | "
            f"{r.get('vs_nanogpt', '')} / {r.get('vs_nanogpt_best_batch', '')} | {r.get('step_ms', '')} | "
            f"{split} | {r.get('peak_mem_gib', '')} | {load} | {note.strip()} |")
    runs = [(r["variant"], b) for r in rows for b in r.get("balance_runs", [])]
    if runs:
        lines += ["", "Router balance on one compiled MoE model, re-initialised per setting (sign rule of DeepSeek-V3, "
                  "bias step gamma; 25 measured steps after the warm-up):", "",
                  "| variant | gamma | warm-up steps | data | tokens/s | load max/mean, summed loads (worst layer) | "
                  "per-step max/mean averaged (worst layer) | loss |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for name, b in runs:
            lines.append(f"| {name} | {b['gamma']}{' ' + b['rule'] if b.get('rule') else ''}"
                         f"{' + seq loss ' + str(b['seq_aux_alpha']) if b.get('seq_aux_alpha') else ''} | {b['warmup']} | {b['data']} | {b['tokens_per_s']:,} | "
                         f"{b['expert_load_max_over_mean']} | {b['expert_load_max_over_mean_stepwise']} | {b['loss_end']} |")
    for r in rows:
        if r.get("ce"):
            lines += md_table(
                f"Cross-entropy rows alone, bf16 logits {r['ce_shape']} (loss + gradient; floor = a copy of the "
                f"same bytes: {r['copy_ms']} ms, {r['copy_tb_s']} TB/s):",
                ["kernel", "ms", "loss rel err", "grad rel err (vs the compiled expression)"],
                [[c["kernel"], c.get("ms", c.get("error", "")), c.get("loss_rel_err", ""), c.get("grad_rel_err", "")]
                 for c in r["ce"]])
        if r.get("head"):
            lines += md_table(
                "The fused head alone (compiled; GEMM + loss kernel + gradient GEMMs, forward + backward):",
                ["head", "fwd+bwd ms", "loss / grad h / grad w rel err vs two sweeps"],
                [[hd["head"], hd.get("fwd_bwd_ms", hd.get("error", "")),
                  f"{hd.get('loss_rel_err', '')} / {hd.get('grad_h_rel_err', '')} / {hd.get('grad_w_rel_err', '')}"]
                 for hd in r["head"]])
        if r.get("attention"):
            lines += md_table(
                "SDPA backends, [32, 12, 1024, 64] bf16 causal, forward + backward:",
                ["backend", "fwd+bwd ms", "fwd ms", "TFLOP/s", "rel err vs the first"],
                [[a["backend"], a.get("fwd_bwd_ms", a.get("error", "")), a.get("fwd_ms", ""), a.get("tflops", ""),
                  a.get("rel_err_vs_cudnn", "")] for a in r["attention"]])
        if r.get("model") == "balance" and r.get("runs"):
            lines += ["", f"Router balance on tinyshakespeare BPE tokens ({r['variant']}, batch {r['batch']}, "
                      f"{r['steps']} steps; load max/mean over the last half: of the summed loads / each step's, "
                      "averaged; worst and median of the MoE layers):", "",
                      "| gamma | seq loss | seed | summed worst | summed median | per-step worst | per-step median "
                      "| per-step worst, by quarter | tokens/s | MFU | loss first/last 20 |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
            for b in r["runs"]:
                h = b["last_half"]
                mfu = f"{b['model_tflops_second_half'] / meta['matmul_tflops'] * 100:.1f}%" if meta.get("matmul_tflops") == meta.get("matmul_tflops") else ""
                lines.append(f"| {b['gamma']} | {b['seq_aux_alpha']} | {b['seed']} | {h['summed_worst']} | {h['summed_median']} | "
                             f"{h['per_step_worst']} | {h['per_step_median']} | "
                             f"{' / '.join(str(qq['per_step_worst']) for qq in b['quarters'])} | "
                             f"{b['tokens_per_s_second_half']:,} | {mfu} | {b['loss_first_20']} / {b['loss_last_20']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few steps (smoke test; runs on CPU)")
    ap.add_argument("--only", default="", help="comma-separated variant names")
    ap.add_argument("--variant", default="", help=argparse.SUPPRESS)
    ap.add_argument("--out", default="", help="results directory (default benchmarks/results; --quick: a temp dir)")
    ap.add_argument("--budget-s", type=float, default=560.0, help="skip variants that would start after this")
    ap.add_argument("--min-left-s", type=float, default=45.0,
                    help="skip a variant when less than this is left of the budget (a warm inductor cache needs less)")
    args = ap.parse_args()
    # a smoke run must not overwrite the measured results
    out_dir = Path(args.out or (Path(tempfile.gettempdir()) / "dsk-bench-quick" if args.quick else RESULTS))
    out_dir.mkdir(parents=True, exist_ok=True)

    if args.variant:
        row = measure(args.variant, VARIANTS[args.variant], quick=args.quick, out_dir=out_dir)
        print("RESULT " + json.dumps(row), flush=True)
        return

    if not torch.cuda.is_available() and not args.quick:
        print(f"{Path(__file__).name}: needs a CUDA GPU (results in docs/performance.md); --quick runs a CPU smoke test")
        return
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    meta = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "grouped_mm": hasattr(torch, "_grouped_mm")}
    meta["matmul_tflops"] = matmul_tflops("cuda") if cuda else float("nan")
    print(f"{meta['gpu']}: bf16 matmul {meta['matmul_tflops']:.0f} TFLOP/s", flush=True)
    names = [n for n in (args.only.split(",") if args.only else DEFAULT) if n]
    rows = []
    for name in names:
        left = args.budget_s - (time.perf_counter() - t_start)
        if left < args.min_left_s:
            rows.append({"variant": name, "error": "skipped: out of time budget"})
            continue
        row = run_variant_subprocess(name, args, out_dir, timeout=left)
        if "tokens_per_s" in row and cuda:
            row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / (meta["matmul_tflops"] * 1e12)
        rows.append(row)
        brief = {k: row.get(k) for k in ("tokens_per_s", "mfu", "step_ms", "host_ms_per_step", "peak_mem_gib", "expert_load_max_over_mean",
                                         "warmup_s", "error")}
        print(name, json.dumps(brief), flush=True)
        (out_dir / "pretrain_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    anchor = next((r for r in rows if r["variant"] == "nanogpt-b32" and "tokens_per_s" in r), None)
    nano = [r for r in rows if r["variant"].startswith("nanogpt") and "tokens_per_s" in r]
    best = max(nano, key=lambda r: r["tokens_per_s"]) if nano else None
    if anchor:
        for r in rows:
            if "tokens_per_s" in r:
                r["vs_nanogpt"] = round(r["tokens_per_s"] / anchor["tokens_per_s"], 3)
                r["vs_nanogpt_best_batch"] = round(r["tokens_per_s"] / best["tokens_per_s"], 3)
        meta["nanogpt_best"] = best["variant"]
    (out_dir / "pretrain_gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (out_dir / "pretrain_gpu.md").write_text(markdown(meta, rows))
    print(markdown(meta, rows))


if __name__ == "__main__":
    main()
