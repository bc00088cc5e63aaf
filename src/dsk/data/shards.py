"""Flat token shards: the `tokens` artifact layout that featurize writes and pretrain reads.

Per split (``train``, ``val``) an artifact holds ``<split>.bin``, the token ids of every
document back to back, each document followed by the end-of-text id, as raw little-endian
integers of ``meta.json``'s ``dtype`` (read with ``np.memmap``, nothing is loaded), and
``<split>_offsets.npy``, int64 start offsets of the documents (length n_docs + 1, the last
entry is the split's token count), so document ``i`` is ``tokens[off[i]:off[i+1]]``.

    $ dsk featurize --vocab-size 1024
    >>> from dsk.data.shards import open_split, read_offsets, read_meta
    >>> tokens = open_split(".dsk/artifacts/featurize/<id>", "train")   # np.memmap
"""

from __future__ import annotations

import json
from pathlib import Path
from itertools import chain
from typing import Any, Iterator, Sequence

import numpy as np

from dsk.errors import DskError

SPLITS = ("train", "val")
META = "meta.json"


def dtype_for_vocab(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 65535 else "uint32"


def bin_path(artifact_dir: str | Path, split: str) -> Path:
    return Path(artifact_dir) / f"{split}.bin"


def offsets_path(artifact_dir: str | Path, split: str) -> Path:
    return Path(artifact_dir) / f"{split}_offsets.npy"


def flatten_documents(docs: Sequence[Sequence[int]], eot_id: int, dtype: str | np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Documents' ids back to back, each followed by ``eot_id``, and each one's length (+1)."""
    lengths = np.fromiter((len(d) + 1 for d in docs), dtype=np.int64, count=len(docs))
    eot = (int(eot_id),)
    # one fromiter over a chained iterator: far cheaper than an array per document
    flat = np.fromiter(chain.from_iterable(chain(d, eot) for d in docs),
                       dtype=np.dtype(dtype).newbyteorder("<"), count=int(lengths.sum()))
    return flat, lengths


class ShardWriter:
    """Append documents' token ids to ``<split>.bin``; ``close()`` writes the offsets."""

    def __init__(self, artifact_dir: str | Path, split: str, dtype: str, eot_id: int):
        self.artifact_dir = Path(artifact_dir)
        self.split = split
        self.eot_id = int(eot_id)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self._file = open(bin_path(artifact_dir, split), "wb")
        self._lengths: list[int] = []

    def add_many(self, docs: Sequence[Sequence[int]]) -> None:
        """Append documents' ids; the end-of-text id is written after each one."""
        self.add_flat(*flatten_documents(docs, self.eot_id, self.dtype))

    def add_flat(self, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Append documents already flattened by :func:`flatten_documents`."""
        self._file.write(np.ascontiguousarray(flat, dtype=self.dtype).tobytes())
        self._lengths.extend(int(n) for n in lengths)

    @property
    def n_tokens(self) -> int:
        return int(sum(self._lengths))

    def close(self) -> np.ndarray:
        self._file.close()
        offsets = np.zeros(len(self._lengths) + 1, dtype=np.int64)
        np.cumsum(np.asarray(self._lengths, dtype=np.int64), out=offsets[1:])
        np.save(offsets_path(self.artifact_dir, self.split), offsets, allow_pickle=False)
        return offsets

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if not self._file.closed:
            self.close()


def read_meta(artifact_dir: str | Path) -> dict[str, Any]:
    path = Path(artifact_dir) / META
    if not path.is_file():
        raise DskError(f"{str(artifact_dir)!r} has no {META}: not a tokens artifact; run `dsk featurize` on text")
    return json.loads(path.read_text())


def open_split(artifact_dir: str | Path, split: str, *, meta: dict[str, Any] | None = None) -> np.ndarray:
    """The split's token ids as a read-only ``np.memmap`` (an empty array for an empty split)."""
    if split not in SPLITS:
        raise DskError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")
    meta = meta or read_meta(artifact_dir)
    dtype = np.dtype(meta["dtype"]).newbyteorder("<")
    path = bin_path(artifact_dir, split)
    if path.stat().st_size == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def read_offsets(artifact_dir: str | Path, split: str) -> np.ndarray:
    return np.load(offsets_path(artifact_dir, split), allow_pickle=False)


def iter_documents(artifact_dir: str | Path, split: str) -> Iterator[np.ndarray]:
    """Each document's ids (including its trailing end-of-text id), in shard order."""
    tokens = open_split(artifact_dir, split)
    offsets = read_offsets(artifact_dir, split)
    for start, end in zip(offsets[:-1], offsets[1:]):
        yield tokens[start:end]
