"""Optimizers and the learning-rate schedule for the training loop.

    >>> opt = make_optimizer(model, name="adamw", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95), device="cpu")
    >>> lr = lr_at(step, base_lr=1e-3, warmup=100, min_ratio=0.1, progress=0.5)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (attention, MLP, experts, router); not norms, biases or embeddings."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (no_decay if p.ndim < 2 or id(p) in embeddings else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023): sign of an interpolated momentum; torch has none built in.

    update = sign(b1 m + (1 - b1) g);  p <- p - lr (update + wd p);  m <- b2 m + (1 - b2) g
    """

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                m = state["exp_avg"]
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(torch.sign(m * b1 + p.grad * (1 - b1)), alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


def newton_schulz(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately orthogonalise the last two dims of ``g`` (Muon's quintic iteration)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        s = x @ x.mT
        x = a * x + (b * s + c * s @ s) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Muon (K. Jordan et al. 2024) for weight matrices, AdamW for everything else.

    Groups with ``muon=True`` take SGD-Nesterov momentum, orthogonalised by Newton-Schulz,
    scaled by sqrt(max(1, rows/cols)); their step size is ``lr * lr_scale``. Other groups are
    plain AdamW. Stacked expert weights [E, out, in] are orthogonalised per expert.
    """

    def __init__(self, groups, lr: float, betas=(0.9, 0.95), eps: float = 1e-8, momentum: float = 0.95):
        super().__init__(groups, dict(lr=lr, betas=betas, eps=eps, momentum=momentum, muon=False, lr_scale=1.0))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            lr, wd = group["lr"] * group["lr_scale"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if group["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"]
                    buf.mul_(group["momentum"]).add_(p.grad)
                    update = newton_schulz(p.grad.add(buf, alpha=group["momentum"]))
                    update *= max(1.0, p.shape[-2] / p.shape[-1]) ** 0.5
                    p.mul_(1 - lr * wd).add_(update, alpha=-lr)
                else:
                    b1, b2 = group["betas"]
                    if not state:
                        state["step"] = torch.zeros(())
                        state["exp_avg"] = torch.zeros_like(p)
                        state["exp_avg_sq"] = torch.zeros_like(p)
                    state["step"] += 1
                    t = float(state["step"])
                    state["exp_avg"].lerp_(p.grad, 1 - b1)
                    state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                    denom = (state["exp_avg_sq"] / (1 - b2**t)).sqrt_().add_(group["eps"])
                    p.mul_(1 - lr * wd).addcdiv_(state["exp_avg"], denom, value=-lr / (1 - b1**t))
        return loss


def split_by_lr_mult(model: nn.Module, groups: list[dict], lr_mults: dict[str, float]) -> list[dict]:
    """Split each group so that parameters whose name contains a key of ``lr_mults`` get their own
    group with ``lr_mult`` set (the loop sets a group's lr to the schedule's lr times ``lr_mult``);
    e.g. ``{"lora_B": 16}`` is LoRA+ (Hayou et al. 2024)."""
    if not lr_mults:
        return groups
    names = {id(p): n for n, p in model.named_parameters()}

    def mult(p) -> float:
        return next((m for key, m in lr_mults.items() if key in names.get(id(p), "")), 1.0)

    out = []
    for g in groups:
        by_mult: dict[float, list] = {}
        for p in g["params"]:
            by_mult.setdefault(mult(p), []).append(p)
        for m, params in sorted(by_mult.items()):
            out.append({**g, "params": params, "lr_mult": m})
    return out


def make_optimizer(
    model: nn.Module, *, name: str, lr: float, weight_decay: float, betas: tuple[float, float], device: str,
    muon_lr_scale: float = 10.0, lr_mults: dict[str, float] | None = None,
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if lr_mults and name == "muon":
        raise ValueError("per-parameter lr multipliers are not supported with muon")
    groups = split_by_lr_mult(model, groups, lr_mults or {})
    for g in groups:
        g.setdefault("lr", lr * g.get("lr_mult", 1.0))
    if name == "muon":
        # Muon is for hidden weight matrices: the output head and the routers stay on AdamW
        adam_ids = {id(p) for n, p in model.named_parameters() if n.startswith("head.") or n.endswith("gate.weight")}
        matrices = [p for p in groups[0]["params"] if id(p) not in adam_ids]
        others = [p for p in groups[0]["params"] if id(p) in adam_ids]
        return Muon([
            {"params": matrices, "weight_decay": weight_decay, "muon": True, "lr_scale": muon_lr_scale},
            {"params": others, "weight_decay": weight_decay},
            {"params": groups[1]["params"], "weight_decay": 0.0},
        ], lr=lr, betas=betas)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    # the fused kernel does the whole update in one pass (CUDA, and CPU in torch >= 2.4)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale the gradients so that their global norm is at most ``max_norm`` (inf: no clipping), then
    take the optimizer step; returns the norm before clipping (a device tensor, no host sync).

    Same update as ``clip_grad_norm_`` + ``step()``. For fused Adam/AdamW the clip factor goes into the
    optimizer kernel as its gradient divisor (the hook AMP's GradScaler uses) instead of a separate
    pass that multiplies every gradient in place: the kernel reads each gradient once either way, so
    this saves one read of all gradients (it writes the scaled ones back, as for GradScaler).
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        optimizer.step()
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads)  # foreach where the device has it (not MPS)
    if not math.isfinite(max_norm):
        optimizer.step()
        return norm
    if not _takes_grad_divisor(optimizer):
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
        optimizer.step()
        return norm
    # clip_grad_norm_ multiplies by min(1, max_norm / (norm + 1e-6)); the kernel divides by its inverse
    optimizer.grad_scale = ((norm.float() + 1e-6) / max_norm).clamp(min=1.0)  # type: ignore[attr-defined]
    try:
        optimizer.step()
    finally:
        del optimizer.grad_scale  # type: ignore[attr-defined]
    return norm


def _takes_grad_divisor(optimizer: torch.optim.Optimizer) -> bool:
    """Fused Adam/AdamW: the kernels divide every gradient by ``optimizer.grad_scale`` if it is set."""
    # AdamW subclasses Adam
    return isinstance(optimizer, torch.optim.Adam) and all(g.get("fused") for g in optimizer.param_groups)


def lr_at(step: int, *, base_lr: float, warmup: int, min_ratio: float, progress: float,
          decay: str = "cosine", cooldown: float = 1.0) -> float:
    """Linear warmup over ``warmup`` steps, then a cosine or linear decay to ``min_ratio * base_lr``.

    ``progress`` in [0, 1] is how far the decay phase has gone: (step - warmup) / (total -
    warmup) for a step budget, or elapsed / budget for a wall-clock budget. ``cooldown`` < 1
    holds the peak for the first ``1 - cooldown`` of that phase and decays over the rest
    (warmup-stable-decay).
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    if cooldown < 1.0:
        progress = max(0.0, progress - (1.0 - cooldown)) / max(cooldown, 1e-9)
    floor = base_lr * min_ratio
    if decay == "linear":
        return floor + (base_lr - floor) * (1.0 - progress)
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))
