"""Token data for training: memory-mapped shards of a featurize ``tokens`` artifact.

Training windows are drawn at random positions, but the batch of step ``s`` is a pure
function of ``(seed, s, micro_step)``: the data position is just the step number, so a
resumed run reads exactly the batches an uninterrupted run would have read. Validation uses
fixed, non-overlapping windows over the held-out shard.

    >>> data = TokenData.open(".dsk/artifacts/featurize/<id>", context=256, batch_size=16, seed=0)
    >>> x, y = data.batch(step=0, micro=0)        # LongTensor [16, 256] each
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from dsk.errors import DskError

SPLITS = ("train", "val")


def read_token_meta(path: Path) -> dict:
    meta_path = path / "meta.json"
    if not meta_path.is_file():
        raise DskError(f"{str(path)!r} is not a tokens artifact (no meta.json); run `dsk featurize` on text first")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError:
        raise DskError(f"{str(meta_path)!r} is not valid JSON; rerun `dsk featurize --force`") from None
    for key in ("dtype", "vocab_size"):
        if key not in meta:
            raise DskError(f"{str(meta_path)!r} lacks {key!r}; rerun `dsk featurize --force`")
    return meta


MIN_REPEAT_SPAN = 8


def repeat_spans(block: np.ndarray, rng: np.random.Generator, fraction: float) -> np.ndarray:
    """Make about ``fraction`` of the rows periodic: the row's first ``L`` tokens, repeated to its end.

    ``L`` is uniform in ``[8, len/2]``, so every token after the first period is a copy of
    the token ``L`` places back, with ``L`` different from row to row: a fixed-offset
    attention head cannot predict it, looking up the previous occurrence of the current
    token and copying its successor (an induction head) can. That is the in-context copying
    a small plain corpus does not teach (docs/finetune.md) and instruction tasks (copy a word
    from the prompt) rely on. Rows are chosen and cut by ``rng`` alone, so a batch stays a
    pure function of (seed, step, micro step). Returns a new array.
    """
    out = block.copy()
    n = out.shape[1]
    if n < 2 * MIN_REPEAT_SPAN:
        return out
    for i in np.flatnonzero(rng.random(out.shape[0]) < fraction):
        period = int(rng.integers(MIN_REPEAT_SPAN, n // 2 + 1))
        out[i] = np.resize(out[i, :period], n)
    return out


@dataclass
class TokenData:
    """Train/val token shards plus the sampling rules; ``batch()`` and ``val_batches()`` feed the loop."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    context: int
    batch_size: int
    seed: int
    val_bytes: int
    eval_tokens: int = 65536
    repeat_fraction: float = 0.0  # share of training rows given a repeated span (repeat_spans)
    rank: int = 0  # several processes: this rank reads rows rank*b/world .. (rank+1)*b/world of each batch
    world: int = 1

    def shard(self, rank: int, world: int) -> "TokenData":
        """This rank's disjoint slice of every global batch (``batch_size`` stays the global size)."""
        if self.batch_size % world:
            raise DskError(f"batch size {self.batch_size} does not split over {world} ranks; use a multiple of {world}")
        return dataclasses.replace(self, rank=rank, world=world)

    @classmethod
    def open(cls, path: str | Path, *, context: int, batch_size: int, seed: int, eval_tokens: int = 65536,
             repeat_fraction: float = 0.0) -> "TokenData":
        """Open the shards by memory map and check them; every problem is a one-line DskError."""
        root = Path(path)
        meta = read_token_meta(root)
        try:
            dtype = np.dtype(meta["dtype"])
        except TypeError:
            raise DskError(f"meta.json dtype {meta['dtype']!r} is not a numpy dtype; rerun `dsk featurize --force`") from None
        if dtype.kind not in "iu":
            raise DskError(f"meta.json dtype {meta['dtype']!r} is not an integer type; rerun `dsk featurize --force`")
        vocab = int(meta["vocab_size"])
        if vocab > np.iinfo(dtype).max + 1:
            raise DskError(
                f"vocabulary of {vocab} tokens does not fit the shards' dtype {dtype.name} "
                f"(max id {np.iinfo(dtype).max}); re-featurize with a wider dtype or a smaller vocabulary"
            )
        shards = {}
        for split in SPLITS:
            f = root / f"{split}.bin"
            if not f.is_file():
                raise DskError(f"tokens artifact {str(root)!r} has no {split}.bin; rerun `dsk featurize --force`")
            n = f.stat().st_size // dtype.itemsize
            if n < context + 1:
                raise DskError(
                    f"{split}.bin holds {n} tokens, fewer than context+1={context + 1}; "
                    f"use a shorter --context or featurize more text"
                    + (" (with a non-zero validation fraction)" if split == "val" else "")
                )
            shards[split] = np.memmap(f, dtype=dtype, mode="r", shape=(n,))
        val_bytes = int(meta.get("val_bytes") or 0)
        if val_bytes <= 0:
            raise DskError("meta.json has no positive val_bytes (needed for bits per byte); rerun `dsk featurize --force`")
        return cls(
            train=shards["train"], val=shards["val"], vocab_size=vocab, context=context,
            batch_size=batch_size, seed=seed, val_bytes=val_bytes, eval_tokens=eval_tokens,
            repeat_fraction=repeat_fraction,
        )

    @property
    def n_val_tokens(self) -> int:
        return int(self.val.shape[0])

    def _windows(self, shard: np.ndarray, starts: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        block = shard[starts[:, None] + np.arange(self.context + 1)].astype(np.int64)
        t = torch.from_numpy(block)
        return t[:, :-1], t[:, 1:]

    def batch(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The training batch of (step, micro step): random windows, reproducible from the seed.

        The global batch does not depend on the number of ranks; each rank takes its slice.
        """
        rng = np.random.default_rng([self.seed, step, micro])
        starts = rng.integers(0, self.train.shape[0] - self.context, size=self.batch_size)
        rows = self.batch_size // self.world
        if self.repeat_fraction <= 0:
            return self._windows(self.train, starts[self.rank * rows : (self.rank + 1) * rows])
        # the repeats are drawn for the global batch (own stream), so every rank count sees the same rows
        block = self.train[starts[:, None] + np.arange(self.context + 1)].astype(np.int64)
        block = repeat_spans(block, np.random.default_rng([self.seed, step, micro, 1]), self.repeat_fraction)
        t = torch.from_numpy(block[self.rank * rows : (self.rank + 1) * rows])
        return t[:, :-1], t[:, 1:]

    def val_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Non-overlapping validation windows, evenly spread, at most ``eval_tokens`` targets."""
        n_windows = (self.val.shape[0] - 1) // self.context
        use = max(1, min(n_windows, math.ceil(self.eval_tokens / self.context)))
        starts = (np.arange(use) * (n_windows // use)) * self.context
        for i in range(0, use, self.batch_size):
            yield self._windows(self.val, starts[i : i + self.batch_size])

    def bits_per_byte(self, loss_nats_per_token: float) -> float:
        """Validation bits per byte of text: comparable across tokenizers."""
        return loss_nats_per_token * self.n_val_tokens / (math.log(2) * self.val_bytes)
