"""Finetuning data: read instruction / preference JSONL, apply the chat template, mask, pack.

Every line is checked before any training: a malformed line, a chat with no assistant turn
or an example longer than the context is reported as ``file:line: problem`` and either stops
the run (``--bad-lines fail``, the default) or goes to ``rejects.jsonl`` (``skip``).

Instruction rows become token rows whose targets are ``-100`` (ignored by the loss) except on
assistant content and its ``<|end|>``. With packing, whole examples are laid end to end in
rows of ``context`` tokens; an example is never split, and :class:`PackedLoss` keeps them
apart (each attends only to itself, positions restart at its ``<|bos|>``), so a packed row
trains exactly like its examples run one by one, only faster. Batches are a pure function of
``(seed, step, micro)`` (epoch-wise permutations), so a resumed run sees the same batches.
Reading, templating and packing live in :mod:`dsk.data.chat` (shared with `dsk eval`) and are
re-exported here; this module adds the split, the training batches and the losses.

    >>> recs, rejects = read_jsonl("data/sample/tasks/train.jsonl", kind="instruction", bad_lines="fail")
    >>> data = SFTData.build(recs, tok, context=256, batch_size=16, seed=0, val_fraction=0.05)
    >>> x, y = data.batch(step=0, micro=0)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch

from dsk.data.chat import IGNORE, Encoded, pack, xy_rows
from dsk.data.chat import encode_instructions, encode_preferences, parse_line, read_jsonl  # noqa: F401  (re-exported)


def split(items: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A seeded (train, val) split; val gets round(n * fraction) items, at least one if fraction > 0."""
    n = len(items)
    n_val = 0 if val_fraction <= 0 or n < 2 else min(n - 1, max(1, round(n * val_fraction)))
    order = np.random.default_rng([seed, 7919]).permutation(n)
    val_idx = set(order[:n_val].tolist())
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


def trim(ids: np.ndarray, labels: np.ndarray, *, at_least: int, pad_multiple: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Drop padding columns no row uses (rounded up to a multiple of 8) so short data runs short rows."""
    trained = (labels != IGNORE).any(axis=0).nonzero()[0]
    used = max(at_least, int(trained.max()) + 1 if len(trained) else 2)
    width = min(ids.shape[1], math.ceil(used / pad_multiple) * pad_multiple)
    return ids[:, :width], labels[:, :width]


@dataclass
class _Order:
    """Epoch-wise permutations of n rows: position k of the stream -> row index."""

    n: int
    seed: int
    _cache: dict[int, np.ndarray] = field(default_factory=dict)

    def __call__(self, k: int) -> int:
        epoch = k // self.n
        if epoch not in self._cache:
            self._cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return int(self._cache[epoch][k % self.n])


@dataclass
class SFTData:
    """Packed instruction rows for :func:`dsk.train.train` (``batch``, ``val_batches``, ``bits_per_byte``)."""

    train_ids: np.ndarray
    train_labels: np.ndarray
    val_ids: np.ndarray
    val_labels: np.ndarray
    batch_size: int
    grad_accum: int
    seed: int
    val_target_bytes: int
    n_train_examples: int
    n_val_examples: int

    def __post_init__(self) -> None:
        self._order = _Order(len(self.train_ids), self.seed)

    @classmethod
    def build(cls, train: Sequence[Encoded], val: Sequence[Encoded], *, context: int, pad_id: int, packing: bool,
              batch_size: int, grad_accum: int, seed: int) -> "SFTData":
        order = np.random.default_rng([seed, 104729]).permutation(len(train))
        longest_val = max((len(e.ids) for e in val), default=2)
        t_ids, t_labels = trim(*pack([train[i] for i in order], context=context, pad_id=pad_id, packing=packing),
                               at_least=longest_val)
        if val:  # never packed: the loop's evaluation runs rows without segment masks
            v_ids, v_labels = pack(val, context=t_ids.shape[1], pad_id=pad_id, packing=False)
        else:
            v_ids, v_labels = t_ids[:0], t_labels[:0]
        return cls(t_ids, t_labels, v_ids, v_labels, batch_size, grad_accum, seed,
                   sum(e.target_bytes for e in val), len(train), len(val))

    @property
    def context(self) -> int:
        return int(self.train_ids.shape[1]) - 1

    @property
    def n_train_rows(self) -> int:
        return int(self.train_ids.shape[0])

    @property
    def n_val_targets(self) -> int:
        return int((self.val_labels[:, 1:] != IGNORE).sum())

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        start = (step * self.grad_accum + micro) * self.batch_size
        idx = [self._order(k) for k in range(start, start + self.batch_size)]
        return xy_rows(self.train_ids[idx], self.train_labels[idx])

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ids, labels = (self.val_ids, self.val_labels) if len(self.val_ids) else (self.train_ids, self.train_labels)
        for i in range(0, len(ids), self.batch_size):
            yield xy_rows(ids[i : i + self.batch_size], labels[i : i + self.batch_size])

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """Validation loss per byte of the assistant text (nan without a validation split)."""
        if not self.val_target_bytes:
            return float("nan")
        return loss_nats_per_token * self.n_val_targets / (math.log(2) * self.val_target_bytes)


class PackedLoss:
    """The loop's loss hook for packed rows: a segment per ``<|bos|>``, so examples stay apart.

    Without it, an example attends to the examples packed before it in its row, which act as
    distractors: on a 4-letter copy task a tiny model stayed at 0% held-out exact match after
    400 steps packed that way, where one example per row reached 100% after 200 steps.
    """

    def __init__(self, bos_id: int):
        self.bos_id = bos_id

    def __call__(self, model, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        segments = torch.cumsum(x == self.bos_id, dim=1)
        return model(x, targets=y, segments=segments).loss, {}


@dataclass
class PreferenceData:
    """Preference pairs for DPO: ``batch`` stacks B chosen rows over the same B rejected rows.

    ``val_batches`` yields the held-out *chosen* rows, so the loop's validation loss is the
    SFT loss on preferred answers (it should not blow up while DPO pushes the margin).
    """

    chosen_ids: np.ndarray
    chosen_labels: np.ndarray
    rejected_ids: np.ndarray
    rejected_labels: np.ndarray
    val_pairs: list[tuple[Encoded, Encoded]]
    batch_size: int
    grad_accum: int
    seed: int
    pad_id: int

    def __post_init__(self) -> None:
        self._order = _Order(len(self.chosen_ids), self.seed)
        self._val = pack([c for c, _ in self.val_pairs], context=self.chosen_ids.shape[1], pad_id=self.pad_id, packing=False)

    @classmethod
    def build(cls, train: Sequence[tuple[Encoded, Encoded]], val: Sequence[tuple[Encoded, Encoded]], *, pad_id: int,
              batch_size: int, grad_accum: int, seed: int) -> "PreferenceData":
        width = max(len(e.ids) for pair in [*train, *val] for e in pair) + 1
        c_ids, c_labels = pack([c for c, _ in train], context=width, pad_id=pad_id, packing=False)
        r_ids, r_labels = pack([r for _, r in train], context=width, pad_id=pad_id, packing=False)
        return cls(c_ids, c_labels, r_ids, r_labels, list(val), batch_size, grad_accum, seed, pad_id)

    @property
    def context(self) -> int:
        return int(self.chosen_ids.shape[1]) - 1

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        start = (step * self.grad_accum + micro) * self.batch_size
        idx = [self._order(k) for k in range(start, start + self.batch_size)]
        ids = np.concatenate([self.chosen_ids[idx], self.rejected_ids[idx]])
        labels = np.concatenate([self.chosen_labels[idx], self.rejected_labels[idx]])
        return xy_rows(ids, labels)

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ids, labels = self._val if self.val_pairs else (self.chosen_ids, self.chosen_labels)
        for i in range(0, len(ids), self.batch_size):
            yield xy_rows(ids[i : i + self.batch_size], labels[i : i + self.batch_size])

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        pairs = self.val_pairs
        if not pairs:
            return float("nan")
        n_targets = int((self._val[1][:, 1:] != IGNORE).sum())
        return loss_nats_per_token * n_targets / (math.log(2) * sum(c.target_bytes for c, _ in pairs))
