"""The augmentation op registry: compose text, image or time-series ops from plain config.

A pipeline is a list of ``{"type": ..., "params": {...}, "p": ...}``; ``p`` is the probability
that an op is applied to each example (default 1). Unknown types or params, and values out of
range (rates outside [0, 1]...), are rejected with the list of valid ones before any work.
The composed :class:`Augmenter` is a plain callable, so a training data loader can use it on
the fly; ``dsk augment`` uses the very same object to write an augmented artifact.

    >>> from dsk.data.augment_ops import compose
    >>> aug = compose([{"type": "RandomRotation", "params": {"degrees": [-30, 30]}},
    ...                {"type": "GaussianNoise", "params": {"sigma": 0.05}, "p": 0.5}], modality="image")
    >>> out = aug(images, labels, seed=step)   # images [N,C,H,W]; out.output, out.labels, out.ops

    $ dsk augment --ops '[{"type": "EDA", "params": {"synonym_replacement": 0.1}}]'
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any, Callable

from dsk.errors import DskError

MODALITIES = ("text", "image", "series")


@dataclass(frozen=True)
class OpDef:
    name: str
    modality: str
    fn: str  # "module:function" inside dsk.data, imported on first use (keeps this module light)
    defaults: dict[str, Any]
    checks: dict[str, str]  # param -> rate | nonneg | positive | int>=1 | range | range01 | pair+
    summary: str
    needs_labels: bool = False


def _op(name, modality, fn, summary, needs_labels=False, **params):
    defaults = {k: v[0] for k, v in params.items()}
    checks = {k: v[1] for k, v in params.items()}
    return OpDef(name, modality, fn, defaults, checks, summary, needs_labels)


OPS: dict[str, OpDef] = {o.name: o for o in [
    # text (EDA); "rate" = fraction of the words changed
    _op("SynonymReplacement", "text", "augment_text:replace_synonyms",
        "replace words (never stop words) by a WordNet synonym", rate=(0.1, "rate")),
    _op("RandomInsertion", "text", "augment_text:insert_synonyms",
        "insert synonyms of the text's words at random places", rate=(0.1, "rate")),
    _op("RandomSwap", "text", "augment_text:swap_words", "swap random pairs of words", rate=(0.1, "rate")),
    _op("RandomDeletion", "text", "augment_text:delete_words",
        "delete each word with probability rate (never all of them)", rate=(0.1, "rate")),
    _op("SentenceShuffle", "text", "augment_text:shuffle_sentences", "shuffle the order of sentences"),
    _op("EDA", "text", "augment_text:eda", "all four EDA ops, each at its rate (0 = off)",
        synonym_replacement=(0.1, "rate"), random_insertion=(0.1, "rate"),
        random_swap=(0.1, "rate"), random_deletion=(0.1, "rate")),
    # images
    _op("RandomRotation", "image", "augment_image:rotate", "rotate by a uniform angle in degrees",
        degrees=([-15.0, 15.0], "range")),
    _op("HorizontalFlip", "image", "augment_image:hflip", "mirror left-right"),
    _op("VerticalFlip", "image", "augment_image:vflip", "mirror top-bottom"),
    _op("RandomResizedCrop", "image", "augment_image:resized_crop",
        "crop a random box (area fraction `scale`, aspect `ratio`) and resize it back",
        scale=([0.6, 1.0], "range01"), ratio=([0.75, 1.3333], "pair+")),
    _op("ColorJitter", "image", "augment_image:color_jitter", "random brightness, contrast, saturation",
        brightness=(0.2, "rate"), contrast=(0.2, "rate"), saturation=(0.2, "rate")),
    _op("GaussianNoise", "image", "augment_image:gaussian_noise", "add N(0, sigma) noise", sigma=(0.05, "nonneg")),
    _op("MixUp", "image", "augment_image:mixup", "blend with a random partner; labels mix by lambda~Beta(alpha, alpha)",
        needs_labels=True, alpha=(0.4, "positive")),
    _op("CutMix", "image", "augment_image:cutmix", "paste a random box from a partner; labels mix by area",
        needs_labels=True, alpha=(1.0, "positive")),
    # time series
    _op("Jitter", "series", "augment_series:jitter", "add N(0, sigma) noise", sigma=(0.03, "nonneg")),
    _op("MagnitudeScaling", "series", "augment_series:magnitude_scaling",
        "multiply each channel by N(1, sigma)", sigma=(0.1, "nonneg")),
    _op("TimeWarp", "series", "augment_series:time_warp",
        "smooth random warp of the time axis (length and endpoints kept)", sigma=(0.2, "nonneg"), knots=(4, "int>=1")),
    _op("WindowSlice", "series", "augment_series:window_slice",
        "take a random window of `ratio` of the length and stretch it back", ratio=(0.9, "rate")),
    _op("FrequencyPerturbation", "series", "augment_series:frequency_perturbation",
        "perturb FFT amplitudes/phases in a band (fractions of Nyquist) and invert",
        band=([0.1, 1.0], "range01"), amplitude=(0.1, "nonneg"), phase=(0.1, "nonneg")),
]}


@dataclass(frozen=True)
class OpSpec:
    op: OpDef
    params: dict[str, Any]
    p: float

    def to_json(self) -> dict[str, Any]:
        return {"type": self.op.name, "params": self.params, "p": self.p}


def _check(where: str, name: str, kind: str, value: Any) -> Any:
    def num(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    bad = f"{where}: {name}={value!r}"
    if kind == "rate":
        if not num(value) or not 0 <= value <= 1:
            raise DskError(f"{bad} must be a number in [0, 1]")
        return float(value)
    if kind in ("nonneg", "positive"):
        if not num(value) or value < 0 or (kind == "positive" and value == 0):
            raise DskError(f"{bad} must be a number {'> 0' if kind == 'positive' else '>= 0'}")
        return float(value)
    if kind == "int>=1":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise DskError(f"{bad} must be an integer >= 1")
        return value
    # pairs: [lo, hi]; a single number d for a range means [-d, d]
    if kind == "range" and num(value):
        value = [-abs(float(value)), abs(float(value))]
    if not (isinstance(value, (list, tuple)) and len(value) == 2 and all(num(v) for v in value)) or value[0] > value[1]:
        raise DskError(f"{bad} must be a pair [low, high] with low <= high")
    lo, hi = float(value[0]), float(value[1])
    if kind == "range01" and not (0 <= lo and hi <= 1):
        raise DskError(f"{bad} must lie within [0, 1]")
    if kind == "pair+" and lo <= 0:
        raise DskError(f"{bad} must be positive")
    return [lo, hi]


def valid_types(modality: str | None = None) -> list[str]:
    return [n for n, o in OPS.items() if modality in (None, o.modality)]


def parse_ops(config: Any, *, modality: str | None = None, where: str = "ops") -> list[OpSpec]:
    """Validate a list of op dicts (or JSON text of one); every problem is one DskError line."""
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except ValueError:
            raise DskError(f"{where}: not valid JSON; expected a list of {{type, params, p}}") from None
    if isinstance(config, dict):
        config = [config]
    if not isinstance(config, list) or not config:
        raise DskError(f"{where}: expected a non-empty list of {{type, params, p}}, got {config!r}")
    specs: list[OpSpec] = []
    for i, item in enumerate(config):
        at = f"{where}[{i}]"
        if isinstance(item, str):
            item = {"type": item}
        if not isinstance(item, dict) or "type" not in item:
            raise DskError(f"{at}: expected a mapping with a 'type', got {item!r}")
        extra = set(item) - {"type", "params", "p"}
        if extra:
            raise DskError(f"{at}: unknown key {sorted(extra)[0]!r}; allowed: type, params, p")
        name = item["type"]
        op = OPS.get(name)
        if op is None or (modality and op.modality != modality):
            kind = f"{modality} " if modality else ""
            raise DskError(f"{at}: unknown {kind}op type {name!r}; valid: {', '.join(valid_types(modality))}")
        at = f"{at} {name}"
        given = item.get("params") or {}
        if not isinstance(given, dict):
            raise DskError(f"{at}: params must be a mapping, got {given!r}")
        unknown = set(given) - set(op.defaults)
        if unknown:
            valid = ", ".join(op.defaults) or "(none)"
            raise DskError(f"{at}: unknown param {sorted(unknown)[0]!r}; valid: {valid}")
        params = {k: _check(at, k, op.checks[k], given.get(k, op.defaults[k])) for k in op.defaults}
        p = _check(at, "p", "rate", item.get("p", 1.0))
        specs.append(OpSpec(op, params, p))
    modalities = {s.op.modality for s in specs}
    if len(modalities) > 1:
        raise DskError(f"{where}: mixes {' and '.join(sorted(modalities))} ops; one pipeline augments one modality")
    return specs


def _resolve(fn: str) -> Callable[..., Any]:
    import importlib

    module, _, name = fn.partition(":")
    return getattr(importlib.import_module(f"dsk.data.{module}"), name)


@dataclass
class Augmented:
    output: Any  # str (text), torch.Tensor [N,C,H,W] (image), np.ndarray [N,T,C] (series)
    labels: Any = None  # soft labels [N, K] for images when given
    ops: Any = field(default_factory=list)  # text: list of op dicts; batch: one list per example


class Augmenter:
    """A composed, seeded augmentation pipeline; call it like a function.

    text:   ``aug(text, seed=s)`` -> Augmented(output=str, ops=[...])
    image:  ``aug(x, y=None, seed=s)`` with x float [N,C,H,W], y soft [N,K] (or int [N])
    series: ``aug(x, seed=s)`` with x [N,T,C] (or [N,T])
    The same seed always gives the same output.
    """

    def __init__(self, specs: list[OpSpec], *, synonyms: str | None = None, text_format: str = "auto"):
        if text_format not in ("auto", "plain", "chat"):
            raise DskError(f"text_format={text_format!r}; valid: auto, plain, chat")
        self.specs = specs
        self.text_format = text_format
        self.modality = specs[0].op.modality
        self.needs_labels = any(s.op.needs_labels for s in specs)
        self._fns = [_resolve(s.op.fn) for s in specs]
        self._synonyms = None
        if self.modality == "text" and any("synonyms" in _text_kwargs(s) for s in specs):
            from dsk.data.augment_text import load_synonyms

            self._synonyms = load_synonyms(synonyms)  # fails now, not halfway through a corpus

    def to_json(self) -> list[dict[str, Any]]:
        return [s.to_json() for s in self.specs]

    def __call__(self, x: Any, y: Any = None, *, seed: int = 0) -> Augmented:
        if self.modality == "text":
            return self._text(x, seed)
        if self.modality == "image":
            return self._image(x, y, seed)
        return self._series(x, seed)

    # ---------------------------------------------------------------- text
    def augment_plain(self, text: str, rng: random.Random, applied: list[dict[str, Any]]) -> str:
        for spec, fn in zip(self.specs, self._fns):
            if spec.p < 1 and rng.random() >= spec.p:
                continue
            kwargs = dict(spec.params)
            if "synonyms" in _text_kwargs(spec):
                kwargs["synonyms"] = self._synonyms
            text = fn(text, rng, **kwargs)
            applied.append({"type": spec.op.name, **spec.params})
        return text

    def _text(self, text: str, seed: int) -> Augmented:
        from dsk.data.augment_text import map_user_turns, parse_structured

        rng = random.Random(seed)
        applied: list[dict[str, Any]] = []
        obj = parse_structured(text) if self.text_format != "plain" else None
        if obj is None and self.text_format == "chat":
            raise DskError(f"text_format=chat but a document is not a chat/instruction JSON record: {text[:60]!r}")
        if obj is None:
            return Augmented(self.augment_plain(text, rng, applied), ops=applied)
        # chat / instruction record: only the user's words change, the answers never do
        turns: list[dict[str, Any]] = []

        def one(turn: str) -> str:
            ops: list[dict[str, Any]] = []
            out = self.augment_plain(turn, rng, ops)
            turns.extend(ops)
            return out

        obj = map_user_turns(obj, one)
        seen = {json.dumps(o, sort_keys=True): o for o in turns}
        return Augmented(json.dumps(obj, ensure_ascii=False), ops=list(seen.values()))

    # ---------------------------------------------------------------- batches
    def _image(self, x: Any, y: Any, seed: int) -> Augmented:
        import numpy as np
        import torch

        from dsk.data.augment_image import one_hot

        if not isinstance(x, torch.Tensor):
            x = torch.as_tensor(np.asarray(x))
        if x.dim() != 4:
            raise DskError(f"images must be a batch [N, C, H, W], got shape {tuple(x.shape)}")
        x = x.float() if not torch.is_floating_point(x) else x
        if y is not None:
            y = torch.as_tensor(np.asarray(y)) if not isinstance(y, torch.Tensor) else y
            y = one_hot(y.numpy()) if y.dim() == 1 else y.float()
        if self.needs_labels and y is None:
            names = ", ".join(s.op.name for s in self.specs if s.op.needs_labels)
            raise DskError(f"{names} mixes labels but the images have none; pass labels or drop {names}")
        rng = np.random.default_rng(seed)
        n = x.shape[0]
        ops: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for spec, fn in zip(self.specs, self._fns):
            mask = rng.random(n) < spec.p
            x, y, details = fn(x, y, rng, mask, **spec.params)
            for i in np.flatnonzero(mask):
                ops[i].append({"type": spec.op.name, **details[i]})
        return Augmented(x, y, ops)

    def _series(self, x: Any, seed: int) -> Augmented:
        import numpy as np

        x = np.asarray(x)
        squeeze = x.ndim == 2
        if squeeze:
            x = x[:, :, None]
        if x.ndim != 3:
            raise DskError(f"time series must be [N, T] or [N, T, C], got shape {x.shape}")
        x = x.astype(np.float64 if x.dtype == np.float64 else np.float32, copy=False)
        rng = np.random.default_rng(seed)
        n = x.shape[0]
        ops: list[list[dict[str, Any]]] = [[] for _ in range(n)]
        for spec, fn in zip(self.specs, self._fns):
            mask = rng.random(n) < spec.p
            x, details = fn(x, rng, mask, **spec.params)
            for i in np.flatnonzero(mask):
                ops[i].append({"type": spec.op.name, **details[i]})
        return Augmented(x[:, :, 0] if squeeze else x, None, ops)


def _text_kwargs(spec: OpSpec) -> tuple[str, ...]:
    return ("synonyms",) if spec.op.name in ("SynonymReplacement", "RandomInsertion", "EDA") else ()


def compose(config: Any, *, modality: str | None = None, synonyms: str | None = None,
            text_format: str = "auto") -> Augmenter:
    """Validate ``config`` and return the callable pipeline (see :class:`Augmenter`)."""
    return Augmenter(parse_ops(config, modality=modality), synonyms=synonyms, text_format=text_format)


def describe_ops(modality: str | None = None) -> list[dict[str, Any]]:
    return [{"type": o.name, "modality": o.modality, "params": o.defaults, "summary": o.summary}
            for o in OPS.values() if modality in (None, o.modality)]


if __name__ == "__main__":  # python -m dsk.data.augment_ops [text|image|series]
    import sys

    for o in describe_ops(sys.argv[1] if len(sys.argv) > 1 else None):
        params = ", ".join(f"{k}={v}" for k, v in o["params"].items())
        print(f"{o['modality']:7} {o['type']:22} {o['summary']}" + (f"  [{params}]" if params else ""))
