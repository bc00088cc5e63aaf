"""Time-series augmentation, vectorised over a batch of series shaped [N, T, C] (numpy).

Each op takes ``x`` [N, T, C], a numpy ``Generator`` and ``mask`` (bool [N]: which series the
op applies to) and returns ``(x, details)``; series outside the mask come back unchanged.
Ops follow Um et al. 2017 (jitter, scaling, time warp) and Le Guennec et al. 2016 (window
slicing), plus a frequency-domain perturbation (Gao et al. 2020).

    >>> from dsk.data.augment_ops import compose
    >>> aug = compose([{"type": "TimeWarp", "params": {"sigma": 0.2}}, {"type": "Jitter"}], modality="series")
    >>> aug(x, seed=0).output.shape == x.shape
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.interpolate import CubicSpline

Details = list[dict[str, Any]]


def _empty(n: int) -> Details:
    return [{} for _ in range(n)]


def _sample_at(x: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Linear interpolation of each series at fractional time positions ``pos`` [N, T']."""
    t = x.shape[1]
    idx = np.clip(np.floor(pos).astype(np.int64), 0, t - 2)
    frac = (pos - idx)[..., None]
    rows = np.arange(x.shape[0])[:, None]
    return x[rows, idx] * (1 - frac) + x[rows, idx + 1] * frac


def jitter(x, rng, mask, *, sigma):
    noise = rng.normal(0.0, sigma, size=x.shape)
    return np.where(mask[:, None, None], x + noise, x), _empty(len(x))


def magnitude_scaling(x, rng, mask, *, sigma):
    factor = rng.normal(1.0, sigma, size=(x.shape[0], 1, x.shape[2]))
    details = [{"factor": [round(float(f), 4) for f in factor[i, 0]]} for i in range(len(x))]
    return np.where(mask[:, None, None], x * factor, x), details


def time_warp(x, rng, mask, *, sigma, knots):
    n, t, _ = x.shape
    if t < 3:
        return x, _empty(n)
    # smooth random speed curve through knots+2 points; its running sum, rescaled to
    # [0, T-1], is the warped time axis: monotone, same length, same endpoints
    knot_pos = np.linspace(0, t - 1, knots + 2)
    speeds = rng.normal(1.0, sigma, size=(knots + 2, n))
    speed = np.clip(CubicSpline(knot_pos, speeds, axis=0)(np.arange(t)).T, 0.1, None)  # [N, T]
    path = np.concatenate([np.zeros((n, 1)), np.cumsum(speed[:, 1:], axis=1)], axis=1)
    path = path / path[:, -1:] * (t - 1)
    out = _sample_at(x, path)
    out[:, 0], out[:, -1] = x[:, 0], x[:, -1]  # exact endpoints, not just up to rounding
    return np.where(mask[:, None, None], out, x), _empty(n)


def window_slice(x, rng, mask, *, ratio):
    n, t, _ = x.shape
    width = max(2, int(round(ratio * t)))
    start = rng.integers(0, t - width + 1, size=n)
    pos = start[:, None] + np.linspace(0, width - 1, t)[None]
    out = _sample_at(x, pos)
    details = [{"start": int(start[i]), "width": width} for i in range(n)]
    return np.where(mask[:, None, None], out, x), details


def frequency_perturbation(x, rng, mask, *, band, amplitude, phase):
    n, t, c = x.shape
    spec = np.fft.rfft(x, axis=1)
    k = spec.shape[1]
    lo, hi = int(np.floor(band[0] * (k - 1))), int(np.ceil(band[1] * (k - 1)))
    lo = max(lo, 1)  # the mean (DC bin) is left alone: a phase on it has no real meaning
    if hi < lo:
        return x, _empty(n)
    width = hi - lo + 1
    gain = np.clip(1.0 + rng.normal(0.0, amplitude, size=(n, width, c)), 0.0, None)
    shift = rng.normal(0.0, phase, size=(n, width, c))
    spec[:, lo : hi + 1] *= gain * np.exp(1j * shift)
    out = np.fft.irfft(spec, n=t, axis=1).astype(x.dtype, copy=False)
    return np.where(mask[:, None, None], out, x), [{"bins": [lo, hi]} for _ in range(n)]
