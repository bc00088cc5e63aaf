"""Near-duplicate detection: 64-bit SimHash with a block-permutation index, or MinHash-LSH.

SimHash (Charikar 2002) maps a document's word shingles to one 64-bit fingerprint; documents
whose fingerprints differ in at most k bits are near-duplicates. The index follows Manku, Jain
and Das Sarma (2007): split the 64 bits into b blocks; two fingerprints within distance k agree
exactly on at least b-k blocks, so one sorted table per choice of b-k blocks finds every such
pair by grouping on those bits, and the cost grows near-linearly with the corpus instead of
comparing all pairs. Pairs found are clustered with union-find.

    $ dsk clean data/raw --method simhash --simhash-k 3 --shingle-size 2
"""

from __future__ import annotations

import itertools
import string
from typing import Iterable, Sequence

import numpy as np
from scipy import sparse

# punctuation becomes a word break; str.translate + split is ~2x faster than a \w+ regex
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation + "‘’“”«»—–…¡¿·"})
_VOTE_SLICE = 1 << 18  # shingles per slice of the vote: 64 MiB of float32 bits


def words_of(text: str) -> list[str]:
    return text.lower().translate(_PUNCT_TO_SPACE).split()


def hash_words(words: list[str], salt: int = 0) -> np.ndarray:
    """Deterministic 64-bit hashes of words, vectorised (pandas' keyed SipHash; Python's own
    str hash is salted per process, so fingerprints would differ between workers and runs)."""
    import pandas as pd

    key = f"dsk-simhash-{salt:04d}"[:16]  # 16 bytes; a different salt gives an independent fingerprint
    return pd.util.hash_array(np.array(words, dtype=object), hash_key=key, categorize=False).astype(np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads combined word hashes over all 64 bits."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        x = x ^ (x >> np.uint64(31))
    return x


_SHINGLE_MULTS = [np.uint64(((0x9E3779B97F4A7C15 * (2 * i + 1)) | 1) & 0xFFFFFFFFFFFFFFFF) for i in range(16)]


def shingle_hashes(word_hashes: np.ndarray, doc_lengths: np.ndarray, shingle_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Hashes of every run of ``shingle_size`` words inside each document, for a batch.

    ``word_hashes`` is the concatenation of the documents' word hashes. Returns the shingle
    hashes and the number of shingles per document. A document shorter than a shingle is one
    shingle of all its words.
    """
    n_words = int(word_hashes.size)
    if shingle_size == 1 or n_words == 0:
        return _mix64(word_hashes.astype(np.uint64)), doc_lengths.astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(doc_lengths)[:-1]]).astype(np.int64)
    ends = starts + doc_lengths
    # the shingle beginning at word j combines words j..j+s-1 (position-weighted, so order counts)
    padded = np.concatenate([word_hashes.astype(np.uint64), np.zeros(shingle_size, np.uint64)])
    combined = np.zeros(n_words, np.uint64)
    with np.errstate(over="ignore"):
        for i in range(shingle_size):
            combined = combined + padded[i:i + n_words] * _SHINGLE_MULTS[i]
    # valid start positions: j + s <= end of its document, or the first word of a short document
    doc_of_word = np.repeat(np.arange(len(doc_lengths)), doc_lengths)
    pos = np.arange(n_words)
    valid = pos + shingle_size <= ends[doc_of_word]
    short = doc_lengths < shingle_size
    if short.any():
        # a short document: one shingle of all its words (zeros beyond the document are masked out)
        for d in np.nonzero(short & (doc_lengths > 0))[0]:
            s, e = starts[d], ends[d]
            h = np.uint64(0)
            with np.errstate(over="ignore"):
                for i in range(e - s):
                    h = h + np.uint64(word_hashes[s + i]) * _SHINGLE_MULTS[i]
            combined[s] = h
            valid[s] = True
    counts = np.bincount(doc_of_word[valid], minlength=len(doc_lengths)).astype(np.int64)
    return _mix64(combined[valid]), counts


def simhash_batch(texts: Sequence[str], shingle_size: int, salt: int = 0) -> np.ndarray:
    """64-bit SimHash fingerprints (uint64) of a batch of texts, vectorised over the batch."""
    lengths = np.empty(len(texts), np.int64)
    flat: list[str] = []
    for i, text in enumerate(texts):
        w = words_of(text)
        lengths[i] = len(w)
        flat.extend(w)
    word_hashes = hash_words(flat, salt) if flat else np.zeros(0, np.uint64)
    sh, counts = shingle_hashes(word_hashes, lengths, shingle_size)
    if sh.size == 0:
        return np.zeros(len(texts), np.uint64)
    # a set of shingles per document (as MinHash uses): repeats of frequent words or lines
    # would otherwise dominate the vote and pull unrelated documents together
    if len(texts) < 1 << 24:
        # one uint64 sort key = (document << 40) | top 40 bits of the shingle hash: np.sort of
        # plain integers is ~8x faster than np.lexsort; the 40 bits are re-mixed to 64 below
        key = (np.repeat(np.arange(len(texts), dtype=np.uint64), counts) << np.uint64(40)) | (sh >> np.uint64(24))
        key = np.sort(key)
        first = np.ones(key.size, bool)
        first[1:] = key[1:] != key[:-1]
        key = key[first]
        counts = np.bincount((key >> np.uint64(40)).astype(np.int64), minlength=len(texts)).astype(np.int64)
        sh = _mix64(key & np.uint64((1 << 40) - 1))
    else:
        doc_of = np.repeat(np.arange(len(texts)), counts)
        order = np.lexsort((sh, doc_of))
        sh, doc_of = sh[order], doc_of[order]
        first = np.ones(sh.size, bool)
        first[1:] = (sh[1:] != sh[:-1]) | (doc_of[1:] != doc_of[:-1])
        sh = sh[first]
        counts = np.bincount(doc_of[first], minlength=len(texts)).astype(np.int64)
    # bit b of the fingerprint is the majority vote of bit b over the document's shingles;
    # per-document sums as a sparse (docs x shingles) product, in slices that bound memory
    ends = np.cumsum(counts)
    votes = np.zeros((len(texts), 64), np.float32)
    lo = 0
    while lo < len(texts):
        start = ends[lo] - counts[lo]
        hi = max(int(np.searchsorted(ends, start + _VOTE_SLICE, side="right")), lo + 1)
        stop = ends[hi - 1]
        bits = np.unpackbits(sh[start:stop].view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")
        indptr = np.concatenate([[0], ends[lo:hi] - start])
        member = sparse.csr_matrix((np.ones(stop - start, np.float32), np.arange(stop - start), indptr),
                                   shape=(hi - lo, stop - start))
        votes[lo:hi] = member @ bits.astype(np.float32)
        lo = hi
    fp_bits = (2 * votes > counts[:, None]).astype(np.uint8)
    return np.packbits(fp_bits, axis=1, bitorder="little").view(np.uint64).reshape(-1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def _block_masks(n_blocks: int) -> list[np.uint64]:
    bounds = np.linspace(0, 64, n_blocks + 1).round().astype(int)
    return [np.uint64(((1 << int(hi)) - 1) ^ ((1 << int(lo)) - 1)) for lo, hi in zip(bounds[:-1], bounds[1:])]


def simhash_pairs(fingerprints: np.ndarray, k: int, n_blocks: int) -> np.ndarray:
    """All index pairs (i, j), i < j, whose fingerprints differ in at most ``k`` bits.

    One table per choice of ``n_blocks - k`` blocks: sorting by those bits puts every pair
    within distance k next to each other in at least one table (pigeonhole), so only runs of
    equal keys are compared. Identical fingerprints are collapsed first so that a big cluster
    of exact copies costs nothing.
    """
    fps = np.asarray(fingerprints, dtype=np.uint64)
    uniq, inverse = np.unique(fps, return_inverse=True)
    pairs: list[np.ndarray] = []
    # documents sharing one fingerprint: chain each to the first of its group
    order = np.argsort(inverse, kind="stable")
    inv_sorted = inverse[order]
    same = inv_sorted[1:] == inv_sorted[:-1]
    if same.any():
        first = order[np.concatenate([[0], np.nonzero(~same)[0] + 1])]
        group_first = first[inv_sorted]
        member = order[1:][same]
        pairs.append(np.stack([group_first[1:][same], member], axis=1))
    masks = _block_masks(n_blocks)
    found: list[np.ndarray] = []
    if len(uniq) > 1 and k > 0:
        for chosen in itertools.combinations(range(n_blocks), n_blocks - k):
            mask = np.uint64(0)
            for c in chosen:
                mask |= masks[c]
            key = uniq & mask
            idx = np.argsort(key, kind="stable")
            key_sorted = key[idx]
            # compare each element with the next d in the same run of equal keys, d = 1, 2, ...
            cand = np.arange(len(idx) - 1)
            d = 1
            while cand.size:
                cand = cand[cand + d < len(idx)]
                cand = cand[key_sorted[cand] == key_sorted[cand + d]]
                if not cand.size:
                    break
                a, b = idx[cand], idx[cand + d]
                close = hamming(uniq[a], uniq[b]) <= k
                if close.any():
                    found.append(np.stack([np.minimum(a[close], b[close]), np.maximum(a[close], b[close])], axis=1))
                d += 1
    if found:
        upairs = np.unique(np.concatenate(found), axis=0)
        # map unique-fingerprint pairs back to one document each (the group's first)
        first_doc = np.full(len(uniq), -1, np.int64)
        first_doc[inverse[::-1]] = np.arange(len(fps))[::-1]
        pairs.append(np.stack([first_doc[upairs[:, 0]], first_doc[upairs[:, 1]]], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    out = np.concatenate(pairs).astype(np.int64)
    return np.sort(out, axis=1)


def verify_pairs(pairs: np.ndarray, fingerprints: np.ndarray, max_distance: int) -> np.ndarray:
    """Keep the pairs whose distance summed over all fingerprint columns is <= max_distance.

    The index finds pairs with the first 64-bit fingerprint; an independent second one cuts
    the pairs that were close by chance (a false pair is rarely unlucky twice), so k can grow
    for recall without losing precision.
    """
    if not len(pairs):
        return pairs
    a, b = fingerprints[pairs[:, 0]], fingerprints[pairs[:, 1]]
    distance = hamming(a, b).astype(np.int64).reshape(len(pairs), -1).sum(axis=1)
    return pairs[distance <= max_distance]


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is always its smallest member."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self.parent
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving
            x = int(parent[x])
        return int(x)

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = (ra, rb) if ra < rb else (rb, ra)
            self.parent[hi] = lo

    def union_pairs(self, pairs: Iterable[tuple[int, int]]) -> None:
        for a, b in pairs:
            self.union(int(a), int(b))

    def roots(self) -> np.ndarray:
        return np.array([self.find(i) for i in range(len(self.parent))], dtype=np.int64)


# --------------------------------------------------------------------------- MinHash-LSH


def shingle_set(text: str, shingle_size: int) -> set[bytes]:
    w = words_of(text)
    if len(w) < shingle_size:
        return {" ".join(w).encode()} if w else set()
    return {" ".join(w[i:i + shingle_size]).encode() for i in range(len(w) - shingle_size + 1)}


def minhash_signatures(texts: Sequence[str], shingle_size: int, num_perm: int, seed: int = 1) -> np.ndarray:
    """datasketch MinHash signatures (uint64 [n, num_perm]) of a batch of texts."""
    from datasketch import MinHash

    out = np.empty((len(texts), num_perm), np.uint64)
    for i, text in enumerate(texts):
        m = MinHash(num_perm=num_perm, seed=seed)
        m.update_batch(list(shingle_set(text, shingle_size)))
        out[i] = m.hashvalues
    return out


def minhash_pairs(signatures: np.ndarray, threshold: float, num_perm: int, seed: int = 1, scheme: str = "affine32") -> np.ndarray:
    """Candidate pairs from datasketch MinHashLSH, kept only when estimated Jaccard >= threshold."""
    from datasketch import LeanMinHash, MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    pairs = []
    for i, sig in enumerate(signatures):
        m = LeanMinHash(seed=seed, hashvalues=sig, scheme=scheme)
        for j in lsh.query(m):
            # the Jaccard check: LSH bands only propose candidates
            if float(np.mean(signatures[j] == sig)) >= threshold:
                pairs.append((j, i))
        lsh.insert(i, m)
    if not pairs:
        return np.zeros((0, 2), np.int64)
    return np.sort(np.array(pairs, dtype=np.int64), axis=1)
