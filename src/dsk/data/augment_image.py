"""Image augmentation as batched torch ops (no torchvision): one call transforms a whole batch.

Every op takes ``x`` float [N, C, H, W], soft labels ``y`` [N, K] or None, a numpy
``Generator`` that draws the per-sample parameters, and ``mask`` (bool [N]: which samples this
op applies to). It returns ``(x, y, details)``; ``details[i]`` is a dict of what was drawn for
sample ``i`` (angle, partner, lambda...) and is recorded as provenance. Samples outside the
mask come back bit-identical. Geometry uses one ``affine_grid`` + ``grid_sample`` per batch.

    >>> from dsk.data.augment_ops import compose
    >>> aug = compose([{"type": "RandomRotation", "params": {"degrees": 15}}, {"type": "MixUp"}], modality="image")
    >>> out = aug(x, y, seed=0)      # out.output [N,C,H,W], out.labels [N,K] soft
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

Details = list[dict[str, Any]]


def _range(value: Any, symmetric: bool = True) -> tuple[float, float]:
    if isinstance(value, (int, float)):
        return (-float(value), float(value)) if symmetric else (float(value), float(value))
    lo, hi = value
    return float(lo), float(hi)


def _keep(x: torch.Tensor, out: torch.Tensor, mask: np.ndarray) -> torch.Tensor:
    m = torch.from_numpy(mask).view(-1, *([1] * (x.dim() - 1)))
    return torch.where(m, out, x)


def _warp(x: torch.Tensor, theta: np.ndarray) -> torch.Tensor:
    grid = F.affine_grid(torch.from_numpy(theta).to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def rotate(x, y, rng, mask, *, degrees):
    n, _, h, w = x.shape
    lo, hi = _range(degrees)
    angles = np.where(mask, rng.uniform(lo, hi, size=n), 0.0)
    rad = np.deg2rad(angles)
    cos, sin = np.cos(rad), np.sin(rad)
    # normalised coords stretch x by W/2 and y by H/2: rescale so non-square images rotate rigidly
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin * h / w
    theta[:, 1, 0], theta[:, 1, 1] = sin * w / h, cos
    out = _warp(x, theta)
    x = _keep(x, out, mask & (angles != 0))  # angle 0 is exactly the identity
    return x, y, [{"angle": round(float(a), 4)} for a in angles]


def hflip(x, y, rng, mask):
    return _keep(x, x.flip(-1), mask), y, [{} for _ in range(len(mask))]


def vflip(x, y, rng, mask):
    return _keep(x, x.flip(-2), mask), y, [{} for _ in range(len(mask))]


def resized_crop(x, y, rng, mask, *, scale, ratio):
    n = x.shape[0]
    area = rng.uniform(scale[0], scale[1], size=n)
    log_r = rng.uniform(math.log(ratio[0]), math.log(ratio[1]), size=n)
    r = np.exp(log_r)
    cw = np.clip(np.sqrt(area * r), 0.0, 1.0)  # crop size as a fraction of width / height
    ch = np.clip(np.sqrt(area / r), 0.0, 1.0)
    cx = rng.uniform(-1, 1, size=n) * (1 - cw)  # crop centre in normalised coords, inside the image
    cy = rng.uniform(-1, 1, size=n) * (1 - ch)
    theta = np.zeros((n, 2, 3))
    theta[:, 0, 0], theta[:, 0, 2] = cw, cx
    theta[:, 1, 1], theta[:, 1, 2] = ch, cy
    out = _warp(x, theta)
    details = [{"box": [round(float(v), 4) for v in (cx[i], cy[i], cw[i], ch[i])]} for i in range(n)]
    return _keep(x, out, mask), y, details


def color_jitter(x, y, rng, mask, *, brightness, contrast, saturation):
    n, c = x.shape[:2]
    b = rng.uniform(1 - brightness, 1 + brightness, size=n)
    k = rng.uniform(1 - contrast, 1 + contrast, size=n)
    s = rng.uniform(1 - saturation, 1 + saturation, size=n)
    view = lambda a: torch.from_numpy(a).to(x.dtype).view(n, 1, 1, 1)  # noqa: E731
    out = x * view(b)
    if c == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        gray = (out * weights).sum(1, keepdim=True)
    else:
        gray = out.mean(1, keepdim=True)
    mean = gray.mean((2, 3), keepdim=True)
    out = (out - mean) * view(k) + mean
    if c == 3:  # saturation needs colour; a grayscale image has none to change
        gray = (out * weights).sum(1, keepdim=True)
        out = (out - gray) * view(s) + gray
    details = [{"brightness": round(float(b[i]), 4), "contrast": round(float(k[i]), 4),
                "saturation": round(float(s[i]), 4) if c == 3 else 1.0} for i in range(n)]
    return _keep(x, out, mask), y, details


def gaussian_noise(x, y, rng, mask, *, sigma):
    noise = torch.from_numpy(rng.standard_normal(size=tuple(x.shape)).astype(np.float32)).to(x.dtype)
    return _keep(x, x + sigma * noise, mask), y, [{} for _ in range(len(mask))]


def mixup(x, y, rng, mask, *, alpha):
    n = x.shape[0]
    lam = np.where(mask, rng.beta(alpha, alpha, size=n), 1.0)
    perm = rng.permutation(n)
    lt = torch.from_numpy(lam).to(x.dtype)
    out = lt.view(n, 1, 1, 1) * x + (1 - lt.view(n, 1, 1, 1)) * x[perm]
    y = lt.view(n, 1).to(y.dtype) * y + (1 - lt.view(n, 1).to(y.dtype)) * y[perm]
    details = [{"partner": int(perm[i]), "lam": round(float(lam[i]), 6)} for i in range(n)]
    return _keep(x, out, mask), y, details


def cutmix(x, y, rng, mask, *, alpha):
    n, _, h, w = x.shape
    lam = rng.beta(alpha, alpha, size=n)
    perm = rng.permutation(n)
    cut = np.sqrt(1.0 - lam)
    ch, cw = (h * cut).astype(int), (w * cut).astype(int)
    cy, cx = rng.integers(0, h, size=n), rng.integers(0, w, size=n)
    y0, y1 = np.clip(cy - ch // 2, 0, h), np.clip(cy + ch - ch // 2, 0, h)
    x0, x1 = np.clip(cx - cw // 2, 0, w), np.clip(cx + cw - cw // 2, 0, w)
    y1, x1 = np.where(mask, y1, y0), np.where(mask, x1, x0)  # empty box = not applied
    rows = (np.arange(h)[None] >= y0[:, None]) & (np.arange(h)[None] < y1[:, None])
    cols = (np.arange(w)[None] >= x0[:, None]) & (np.arange(w)[None] < x1[:, None])
    box = torch.from_numpy(rows[:, :, None] & cols[:, None, :]).unsqueeze(1)
    out = torch.where(box, x[perm], x)
    # the label weight of the partner is the area actually pasted (after clipping at the border)
    pasted = (y1 - y0) * (x1 - x0) / float(h * w)
    pt = torch.from_numpy(pasted).to(y.dtype).view(n, 1)
    y = (1 - pt) * y + pt * y[perm]
    details = [{"partner": int(perm[i]), "box": [int(y0[i]), int(x0[i]), int(y1[i]), int(x1[i])],
                "lam": round(float(1 - pasted[i]), 6)} for i in range(n)]
    return out, y, details


def one_hot(labels: np.ndarray, n_classes: int | None = None) -> torch.Tensor:
    labels = np.asarray(labels).astype(np.int64)
    k = int(n_classes or labels.max() + 1)
    return F.one_hot(torch.from_numpy(labels), k).to(torch.float32)
