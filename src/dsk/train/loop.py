"""The training loop shared by `dsk pretrain` and `dsk finetune`: one function, labelled phases.

``train(model, data, cfg, run_dir=...)`` runs optimizer steps with gradient accumulation,
mixed precision (bf16 autocast, or fp16 with dynamic loss scaling), clipping, a warmup +
cosine schedule, DeepSeek-V3's router-bias balancing after each step, periodic evaluation
(loss and bits per byte), metrics.jsonl, checkpoints and resume, a wall-clock budget and an
optional profiler window. ``data`` is anything with ``batch(step, micro)``,
``val_batches()``, ``bits_per_byte(loss)`` and ``batch_size``/``context`` (see
:class:`dsk.train.data.TokenData`).

    >>> result = train(model, data, TrainConfig(max_steps=200, lr=2e-3), run_dir=Path("run"))
    >>> result.val_bpb
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F


from dsk import console, tracking
from dsk.errors import DskError
from dsk.models import Transformer
from dsk.train import distributed
from dsk.train.checkpoint import fingerprint, latest_checkpoint, load_checkpoint, save_checkpoint
from dsk.train.optim import clip_and_step, lr_at, make_optimizer

log_default = logging.getLogger("dsk.train")
TIMING_KEYS = ("tokens_per_s", "elapsed_s")


@dataclass
class TrainConfig:
    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 100
    schedule_clock: str = "steps"  # "steps", or "time": the cosine spans max_minutes (not reproducible)
    lr_decay: str = "cosine"  # cosine | linear
    cooldown_frac: float = 1.0  # < 1: hold the peak lr, decay over this last fraction (WSD)
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    optimizer: str = "adamw"  # adamw | lion | muon (Muon on matrices, AdamW on the rest)
    muon_lr_scale: float = 10.0  # Muon's step size = lr * muon_lr_scale
    # parameters whose name contains a key train at lr * value (e.g. {"lora_B": 16}: LoRA+)
    lr_mults: dict[str, float] = field(default_factory=dict)
    precision: str = "fp32"  # fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda | mps
    compile: bool = False
    cuda_graphs: bool = False  # with compile on one CUDA device: torch.compile's "reduce-overhead" mode
    bf16_residual: bool = False  # with precision bf16: the residual stream in bf16 too (Transformer.residual_dtype)
    activation_checkpointing: bool = False
    eval_every: int = 200  # 0: only at the end
    log_every: int = 10
    checkpoint_every: int = 0  # steps; 0 = off
    checkpoint_every_minutes: float = 0.0  # 0 = off
    keep_checkpoints: int = 3
    max_minutes: float = 0.0  # wall-clock budget for the loop; 0 = none
    profile_steps: int = 0  # profile this many steps (after one warm-up step) with torch.profiler
    threads: int = 0  # torch CPU threads; 0 leaves torch's default
    # several processes (under torchrun; see dsk.train.distributed): ddp | fsdp, and DDP's
    # gradient compression none | bf16 | fp16 | powersgd
    strategy: str = "ddp"
    comm_hook: str = "none"


@dataclass
class TrainResult:
    steps: int
    tokens: int
    seconds: float
    tokens_per_s: float
    val_loss: float
    val_bpb: float
    stopped_by: str  # max_steps | max_minutes
    device: str
    resumed_from_step: int = 0
    evals: list[dict[str, Any]] = field(default_factory=list)


def pick_device(name: str = "auto") -> str:
    """auto -> cuda, then mps, then cpu."""
    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def autocast_context(device: str, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, data: Any, device: str, precision: str) -> float:
    """Mean validation loss in nats per token over the data's validation windows."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in data.val_batches():
        x, y = x.to(device), y.to(device)
        with autocast_context(device, precision):
            logits = model(x).logits
        total += float(F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum"))
        count += int((y != -100).sum())  # targets of -100 (finetuning's masked prompts) are not scored
    model.train(was_training)
    return total / max(1, count)


def max_violation(load: torch.Tensor) -> float:
    """DeepSeek's MaxVio: max expert load over mean load, minus one (0 is perfect balance)."""
    mean = float(load.float().mean())
    return float(load.max()) / mean - 1.0 if mean > 0 else 0.0


def train(
    model: Transformer,
    data: Any,
    cfg: TrainConfig,
    *,
    run_dir: Path,
    resume_from: Path | None = None,
    run_fingerprint: dict[str, Any] | None = None,
    log: logging.Logger | None = None,
    on_step: Callable[[int], None] | None = None,
    loss_fn: Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]] | None = None,
) -> TrainResult:
    """Train ``model`` in place; metrics, checkpoints and profiles go under ``run_dir``.

    ``loss_fn(model, x, y) -> (loss, stats)`` replaces the default next-token loss (e.g. DPO
    in `dsk finetune`); the interval means of its ``stats`` are added to the train records.
    """
    log = log or log_default
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_dir = run_dir / "checkpoints"
    metrics_path = run_dir / "metrics.jsonl"
    timing_path = run_dir / "timing.jsonl"

    # ---- 1. setup: device, precision, optimizer, loss scaler ---------------------------
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    kind = pick_device(cfg.device)  # cuda | mps | cpu
    # under torchrun: join the group; each rank drives its own GPU (cuda:<local rank>)
    dinfo = distributed.init(kind)
    if cfg.cuda_graphs and (not cfg.compile or kind != "cuda" or dinfo.enabled):
        raise DskError("--cuda-graphs needs --compile and one CUDA device "
                       f"(this run: compile {'on' if cfg.compile else 'off'}, {dinfo.world} x {kind}); drop --cuda-graphs")
    main = dinfo.is_main  # only rank 0 writes metrics, logs and full checkpoints
    if not main:
        console.set_mode(quiet=True)
    device = distributed.rank_device(dinfo, kind)
    model.to(device).train()
    model.grad_checkpointing = cfg.activation_checkpointing
    if kind == "cuda" and hasattr(model, "use_fused"):
        # the same function with fewer, wider GEMMs and the LM head fused with the loss (docs/performance.md);
        # a custom loss_fn may read the logits, so it keeps the plain head
        model.use_fused()
        model.fused_loss = loss_fn is None
    if cfg.bf16_residual and cfg.precision == "bf16" and hasattr(model, "residual_dtype"):
        model.residual_dtype = torch.bfloat16
    sharded = dinfo.enabled and cfg.strategy == "fsdp"
    wrapped = distributed.wrap(model, dinfo, strategy=cfg.strategy, comm_hook=cfg.comm_hook) if dinfo.enabled else model
    # CUDA graphs replay each step's kernels without Python launching them one by one: 0.3 ms of a
    # 62-ms GPT-2 step on an H100 (docs/performance.md)
    forward = torch.compile(wrapped, mode="reduce-overhead" if cfg.cuda_graphs else None) if cfg.compile else wrapped
    optimizer = make_optimizer(
        model, name=cfg.optimizer, lr=cfg.lr, weight_decay=cfg.weight_decay,
        betas=(cfg.beta1, cfg.beta2), device=kind, muon_lr_scale=cfg.muon_lr_scale,
        lr_mults=cfg.lr_mults,
    )
    # fp16 needs loss scaling; the scaler is a pass-through for fp32/bf16
    scaler = torch.amp.GradScaler(
        kind if kind in ("cuda", "cpu") else "cpu", init_scale=2.0**15, growth_interval=2000,
        enabled=cfg.precision == "fp16",
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    tokens_per_step = data.batch_size * data.context * cfg.grad_accum
    # what a checkpoint must match to be resumed: the model config and the caller's run identity
    fp = fingerprint(model.cfg.to_dict(), run_fingerprint or {})

    # ---- 2. resume: weights, optimizer, scaler, RNG and data position --------------------
    step, elapsed_before, start_step = 0, 0.0, 0
    if resume_from is not None:
        if distributed.is_sharded_checkpoint(resume_from):
            # torch.distributed.checkpoint reshards onto however many ranks (or one process) we have now
            state = distributed.load_sharded(resume_from, model=model, optimizer=optimizer, expect_fingerprint=fp)
        elif sharded:
            raise DskError(f"checkpoint {str(resume_from)!r} was written without FSDP; resume it with --strategy ddp")
        else:
            state = load_checkpoint(resume_from, model, expect_fingerprint=fp)
            model.to(device)
            optimizer.load_state_dict(state["optimizer"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_torch"])
        if kind == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"])
        step = start_step = int(state["step"])
        elapsed_before = float(state["elapsed_s"])
        if main:
            _truncate_metrics(metrics_path, step)
            _truncate_metrics(timing_path, step)
        log.info(f"resumed from {resume_from.name} (step {step})")
    elif main:
        metrics_path.unlink(missing_ok=True)
        timing_path.unlink(missing_ok=True)

    def checkpoint() -> None:
        trainer_state = {
            "step": step,
            "scaler": scaler.state_dict(),
            "rng_torch": torch.get_rng_state(),
            "rng_cuda": torch.cuda.get_rng_state() if kind == "cuda" else None,
            "elapsed_s": elapsed(),
        }
        if sharded:  # every rank writes its shards
            distributed.save_sharded(ckpt_dir, step=step, model=model, optimizer=optimizer, trainer_state=trainer_state,
                                     meta={"fingerprint": fp}, keep=cfg.keep_checkpoints, info=dinfo)
        elif main:  # DDP replicas are identical: rank 0's full checkpoint resumes on any number of ranks
            trainer_state["optimizer"] = optimizer.state_dict()
            save_checkpoint(ckpt_dir, step=step, model=model, trainer_state=trainer_state,
                            meta={"fingerprint": fp}, keep=cfg.keep_checkpoints)

    # metrics.jsonl holds only what is reproducible on CPU (losses, lr, norms, expert load);
    # wall-clock numbers (tokens/s, elapsed) go to timing.jsonl
    metrics_file = open(metrics_path if main else os.devnull, "a", encoding="utf-8")
    timing_file = open(timing_path if main else os.devnull, "a", encoding="utf-8")

    def write(record: dict[str, Any]) -> None:
        record = dict(record)
        timing = {k: record.pop(k) for k in TIMING_KEYS if k in record}
        metrics_file.write(json.dumps(record, sort_keys=True) + "\n")
        metrics_file.flush()
        if timing:
            timing_file.write(json.dumps({"step": record["step"], "split": record["split"], **timing}) + "\n")
            timing_file.flush()

    started = time.perf_counter()

    def elapsed() -> float:
        return elapsed_before + time.perf_counter() - started

    budget_s = cfg.max_minutes * 60.0
    last_ckpt_time = time.perf_counter()
    # no host-device sync per step: losses, norms and expert loads stay on the device and are
    # read once per log interval; the interval's time runs from its first step to that read
    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
    interval_start = time.perf_counter()
    interval_load: dict[int, torch.Tensor] = {}
    interval_stats: dict[str, float] = {}  # from loss_fn
    evals: list[dict[str, Any]] = []
    val_loss = float("nan")
    stopped_by = "max_steps"
    profiler = None
    profile_start = start_step + 1

    # ---- 3. the loop ---------------------------------------------------------------------
    try:
        with console.progress_task("train", total=cfg.max_steps) as advance:
            advance(start_step)
            while step < cfg.max_steps:
                if cfg.profile_steps and step == profile_start and profiler is None:
                    profiler = _start_profiler(kind)

                # 3a. learning rate for this step
                if cfg.schedule_clock == "time" and budget_s > 0:
                    progress = elapsed() / budget_s
                else:
                    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
                lr = lr_at(step, base_lr=cfg.lr, warmup=cfg.warmup_steps, min_ratio=cfg.min_lr_ratio, progress=progress,
                           decay=cfg.lr_decay, cooldown=cfg.cooldown_frac)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_mult", 1.0)

                # 3b. forward/backward over the micro-batches
                step_loss = torch.zeros((), device=device)
                for micro in range(cfg.grad_accum):
                    x, y = data.batch(step, micro)
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    if cfg.cuda_graphs:  # a new replay may reuse the last one's output memory
                        torch.compiler.cudagraph_mark_step_begin()
                    # several ranks: all-reduce gradients only after the step's last micro-batch
                    with distributed.grad_sync(wrapped, micro == cfg.grad_accum - 1):
                        with autocast_context(device, cfg.precision):
                            if loss_fn is None:
                                out = forward(x, targets=y)
                                full_loss, logged = out.loss, out.aux.get("ce_loss", out.loss)
                            else:  # e.g. DPO in `dsk finetune`
                                full_loss, stats = loss_fn(forward, x, y)
                                logged = full_loss
                                for k, v in stats.items():
                                    interval_stats[k] = interval_stats.get(k, 0.0) + v / cfg.grad_accum
                        scaler.scale(full_loss / cfg.grad_accum).backward()
                    step_loss += logged.detach().float() / cfg.grad_accum

                # 3c. unscale, clip, optimizer step (skipped by the scaler on fp16 overflow)
                max_norm = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
                skipped = False
                if scaler.is_enabled() or sharded:
                    scaler.unscale_(optimizer)
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_norm)
                    scale_before = scaler.get_scale() if scaler.is_enabled() else 1.0
                    scaler.step(optimizer)
                    scaler.update()
                    skipped = scaler.is_enabled() and scaler.get_scale() < scale_before
                else:  # bf16/fp32, unsharded: the clip factor rides in the fused optimizer kernel
                    grad_norm = clip_and_step(optimizer, trainable, max_norm)
                optimizer.zero_grad(set_to_none=True)

                # 3d. aux-loss-free balancing: nudge router biases toward equal expert load
                if skipped:
                    for moe in model.moe_layers().values():
                        moe.load.zero_()
                else:
                    if dinfo.enabled:  # every rank nudges its router biases by the global load
                        distributed.sum_expert_load(model.moe_layers())
                    for i, load in model.update_router_bias().items():
                        interval_load[i] = interval_load.get(i, 0) + load
                step += 1
                interval_loss = interval_loss + step_loss
                interval_steps += 1
                interval_tokens += tokens_per_step

                if profiler is not None:
                    profiler.step()
                    if step >= profile_start + cfg.profile_steps:
                        _finish_profiler(profiler, run_dir, kind)
                        profiler = None

                # 3e. log training metrics
                if step % cfg.log_every == 0 or step == cfg.max_steps:
                    if dinfo.enabled:
                        interval_loss = distributed.mean(interval_loss)
                    mean_loss = float(interval_loss) / interval_steps  # the interval's one sync
                    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
                        grad_norm = grad_norm.full_tensor()
                    tok_s = interval_tokens / max(time.perf_counter() - interval_start, 1e-9)
                    interval_load = {i: v.cpu() for i, v in interval_load.items()}
                    record = {
                        "step": step, "split": "train", "loss": round(mean_loss, 5),
                        "lr": lr, "grad_norm": round(float(grad_norm), 4), "tokens_per_s": round(tok_s, 1),
                        "tokens": step * tokens_per_step, "elapsed_s": round(elapsed(), 2),
                    }
                    if scaler.is_enabled():
                        record["loss_scale"] = scaler.get_scale()
                    for k, v in interval_stats.items():
                        record[k] = round(v / interval_steps, 5)
                    if interval_load:
                        record["expert_load"] = {str(i): v.tolist() for i, v in interval_load.items()}
                        record["max_vio"] = {str(i): round(max_violation(v), 4) for i, v in interval_load.items()}
                    status = f"loss {record['loss']:.3f} · {tok_s / 1000:.1f}k tok/s"
                    write(record)
                    advance(interval_steps, status=status)
                    interval_loss, interval_steps, interval_tokens = 0.0, 0, 0
                    interval_load = {}
                    interval_stats = {}
                    interval_start = time.perf_counter()

                # 3f. evaluate
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    paused = time.perf_counter()
                    val_loss = evaluate(forward, data, device, cfg.precision)
                    evals.append(_eval_record(write, step, val_loss, data, elapsed()))
                    log.info(f"step {step}: val loss {val_loss:.4f}, {evals[-1]['bpb']:.4f} bits/byte")
                    interval_start += time.perf_counter() - paused  # evaluation is not training time

                # 3g. checkpoint by steps or minutes
                due_steps = cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                due_time = cfg.checkpoint_every_minutes and (
                    time.perf_counter() - last_ckpt_time >= cfg.checkpoint_every_minutes * 60
                )
                over_budget = bool(budget_s and elapsed() >= budget_s and step < cfg.max_steps)
                if dinfo.enabled:  # wall clocks differ between ranks: rank 0 decides, at log steps
                    due_time, over_budget = (
                        distributed.agree(bool(due_time), over_budget, device=device)
                        if step % cfg.log_every == 0 else (False, False)
                    )
                if (due_steps or due_time) and step < cfg.max_steps:
                    paused = time.perf_counter()
                    checkpoint()
                    last_ckpt_time = time.perf_counter()
                    interval_start += last_ckpt_time - paused

                if on_step is not None:
                    on_step(step)

                # 3h. wall-clock budget
                if over_budget:
                    stopped_by = "max_minutes"
                    log.info(f"time budget of {cfg.max_minutes:g} min reached at step {step}")
                    break
    except BaseException:
        metrics_file.close()
        timing_file.close()
        raise
    finally:
        if profiler is not None:
            _finish_profiler(profiler, run_dir, kind)

    # ---- 4. final evaluation -------------------------------------------------------------
    try:
        train_seconds = elapsed()
        if not evals or evals[-1]["step"] != step:
            val_loss = evaluate(forward, data, device, cfg.precision)
            evals.append(_eval_record(write, step, val_loss, data, elapsed()))
    finally:
        metrics_file.close()
        timing_file.close()
    model.eval()
    done_tokens = (step - start_step) * tokens_per_step
    loop_seconds = time.perf_counter() - started
    return TrainResult(
        steps=step, tokens=step * tokens_per_step, seconds=round(train_seconds, 3),
        tokens_per_s=round(done_tokens / max(loop_seconds, 1e-9), 1), val_loss=evals[-1]["loss"],
        val_bpb=evals[-1]["bpb"], stopped_by=stopped_by, device=kind, resumed_from_step=start_step,
        evals=evals,
    )


def _eval_record(write: Callable, step: int, val_loss: float, data: Any, elapsed_s: float) -> dict[str, Any]:
    record = {"step": step, "split": "val", "loss": round(val_loss, 6),
              "bpb": round(data.bits_per_byte(val_loss), 6), "elapsed_s": round(elapsed_s, 2)}
    write(record)
    # observers (e.g. a `dsk tune` study deciding whether to prune) see every evaluation
    tracking.report(step, {"val_loss": record["loss"], "val_bpb": record["bpb"]})
    return record


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics logged after the checkpoint we resume from (they will be logged again)."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in keep))


def _start_profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    prof = profile(activities=activities, record_shapes=False)
    prof.start()
    return prof


def _finish_profiler(prof, run_dir: Path, device: str) -> None:
    prof.stop()
    prof.export_chrome_trace(str(run_dir / "profile_trace.json"))
    sort_by = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    (run_dir / "profile_ops.txt").write_text(prof.key_averages().table(sort_by=sort_by, row_limit=30) + "\n")
