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


def make_optimizer(
    model: nn.Module, *, name: str, lr: float, weight_decay: float, betas: tuple[float, float], device: str
) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "lion":
        return Lion(groups, lr=lr, betas=betas)
    # the fused kernel does the whole update in one pass (CUDA, and CPU in torch >= 2.4)
    try:
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8, fused=device in ("cuda", "cpu"))
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def lr_at(step: int, *, base_lr: float, warmup: int, min_ratio: float, progress: float) -> float:
    """Linear warmup over ``warmup`` steps, then cosine decay to ``min_ratio * base_lr``.

    ``progress`` in [0, 1] is how far the decay phase has gone: (step - warmup) / (total -
    warmup) for a step budget, or elapsed / budget for a wall-clock budget.
    """
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, max(0.0, progress))
    floor = base_lr * min_ratio
    return floor + 0.5 * (base_lr - floor) * (1 + math.cos(math.pi * progress))
