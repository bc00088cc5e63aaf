"""Near-duplicate detection: 64-bit SimHash with a block-permutation index, or MinHash-LSH.

SimHash (Charikar 2002) maps a document's word shingles to one 64-bit fingerprint; documents
whose fingerprints differ in at most k bits are near-duplicates. The index follows Manku, Jain
and Das Sarma (2007): split the 64 bits into b blocks; two fingerprints within distance k agree
exactly on at least b-k blocks, so one sorted table per choice of b-k blocks finds every such
pair by grouping on those bits, and the cost grows near-linearly with the corpus instead of
comparing all pairs. A second, independent fingerprint confirms each pair (verify_pairs).
Pairs found are clustered with union-find.

Fingerprints are computed a batch at a time with numpy (one byte buffer per batch, no Python
work per word); the index sorts with numpy and scans runs of equal keys with a small numba
kernel. benchmarks/clean_dedup.py measures both against datasketch's MinHashLSH.

    $ dsk clean data/raw --method simhash --simhash-k 10 --simhash-verify 22 --shingle-size 1
"""

from __future__ import annotations

import functools
import itertools
import string
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Sequence

import numpy as np

# punctuation becomes a word break; str.translate + split is ~2x faster than a \w+ regex
_PUNCT_TO_SPACE = str.maketrans({c: " " for c in string.punctuation + "‘’“”«»—–…¡¿·"})


def words_of(text: str) -> list[str]:
    return text.lower().translate(_PUNCT_TO_SPACE).split()


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


# ---------------------------------------------------------------------- batch tokeniser + hashes
#
# Fingerprinting is vectorised over a whole batch: the batch is one UTF-8 buffer, words are runs
# of non-separator bytes found with one comparison, and each word is hashed from 8-byte loads at
# its start (an unaligned uint64 view of the buffer), so Python does O(1) work per batch, not per
# word: 5-6x faster than per-document str.split + pandas hashing (docs/clean.md).

# bytes.translate table: ASCII letters lower-cased; ASCII punctuation, whitespace and control
# characters become the separator (a space), exactly the words of words_of() for ASCII text
_BYTE_TABLE = bytes(
    32 if (chr(c) in string.punctuation or chr(c).isspace() or c < 32 or c == 127)
    else (c + 32 if 65 <= c <= 90 else c)
    for c in range(256))
# non-ASCII text also gets words_of()'s Unicode punctuation and every Unicode space as separators
# (str.split() breaks words on those)
_UNICODE_TO_SPACE = str.maketrans({c: " " for c in "‘’“”«»—–…¡¿·"} | {
    chr(c): " " for c in range(128, 0x3001) if chr(c).isspace()})
_LOW_BYTES = np.array([(1 << (8 * i)) - 1 for i in range(8)] + [(1 << 64) - 1], np.uint64)  # by byte count
_LANES = np.uint64(0x0101010101010101)
_SALTS = [np.uint64((0x9E3779B97F4A7C15 * (s + 1)) & 0xFFFFFFFFFFFFFFFF) for s in range(64)]


def _batch_bytes(texts: Sequence[str]) -> tuple[bytes, np.ndarray]:
    """The batch as one separator-joined, lower-cased buffer, and each document's byte length."""
    joined = "\n".join(texts)
    if joined.isascii():
        return joined.encode("ascii").translate(_BYTE_TABLE), np.fromiter(map(len, texts), np.int64, len(texts))
    encoded = [t.lower().translate(_UNICODE_TO_SPACE).encode("utf-8", "replace") for t in texts]
    return b"\n".join(encoded).translate(_BYTE_TABLE), np.fromiter(map(len, encoded), np.int64, len(texts))


def word_hashes_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of the words of each text (the words of ``words_of``), for a whole batch.

    Returns the concatenated word hashes and the number of words per text. Deterministic across
    processes and runs (no salted str hash).
    """
    body, lengths = _batch_bytes(texts)
    # one leading separator so that every word has a start edge; 8 trailing ones so that an
    # 8-byte load at any word start stays inside the buffer
    buf = np.frombuffer(b" " + body + b" " * 8, np.uint8)
    is_word = buf != 32
    edges = np.flatnonzero(is_word[1:] != is_word[:-1]) + 1
    starts, ends = edges[0::2], edges[1::2]
    n_bytes = ends - starts
    # uint64 load at every byte offset (unaligned, strides of one byte: a view, no copy)
    load = np.ndarray(shape=(len(buf) - 7,), dtype=np.dtype("<u8"), buffer=buf, strides=(1,))
    # little-endian load: the first byte is the low byte, bytes past the word are masked off;
    # words hold no zero byte, so distinct words of <= 8 bytes give distinct values
    h = load[starts] & _LOW_BYTES[np.minimum(n_bytes, 8)]
    offset = 8
    longer = np.flatnonzero(n_bytes > offset)
    while longer.size:  # 8 more bytes of every word longer than offset: one step per 8 bytes
        h[longer] = _mix64(h[longer]) ^ (load[starts[longer] + offset] & _LOW_BYTES[np.minimum(n_bytes[longer] - offset, 8)])
        offset += 8
        longer = longer[n_bytes[longer] > offset]
    # word count per text: words starting before the end of each text's bytes (+1 for the
    # leading separator, +1 per joining separator)
    text_ends = np.cumsum(lengths + 1)
    counts = np.diff(np.searchsorted(starts, text_ends), prepend=0)
    return _mix64(h), counts.astype(np.int64)


def simhash_fingerprints(texts: Sequence[str], shingle_size: int, n_fingerprints: int = 1) -> np.ndarray:
    """``n_fingerprints`` independent 64-bit SimHash fingerprints (uint64 [n, n_fingerprints]).

    Column s equals ``simhash_batch(texts, shingle_size, salt=s)``; the shingles are found and
    deduplicated once for all columns. Vectorised over the batch: no per-document Python.
    """
    n = len(texts)
    out = np.zeros((n, n_fingerprints), np.uint64)
    if n == 0:
        return out
    if n >= 1 << 24:  # the document number must fit the 24 bits of the sort key below
        half = n // 2
        return np.concatenate([simhash_fingerprints(texts[:half], shingle_size, n_fingerprints),
                               simhash_fingerprints(texts[half:], shingle_size, n_fingerprints)])
    word_hashes, n_words = word_hashes_batch(texts)
    shingles, counts = shingle_hashes(word_hashes, n_words, shingle_size)
    if shingles.size == 0:
        return out
    # a set of shingles per document (as MinHash uses): repeats of frequent words or lines
    # would otherwise dominate the vote and pull unrelated documents together. One uint64 sort
    # key = (document << 40) | top 40 bits of the shingle hash: np.sort of plain integers is
    # far faster than np.lexsort; the 40 bits are re-mixed to 64 per fingerprint below
    doc = np.repeat(np.arange(n, dtype=np.uint64), counts)
    key = np.sort((doc << np.uint64(40)) | (shingles >> np.uint64(24)))
    first = np.empty(key.size, bool)
    first[0] = True
    np.not_equal(key[1:], key[:-1], out=first[1:])
    key = key[first]
    counts = np.bincount((key >> np.uint64(40)).astype(np.intp), minlength=n)
    low40 = key & np.uint64((1 << 40) - 1)
    docs = np.flatnonzero(counts)
    counts = counts[docs]
    # bit b of the fingerprint is the majority vote of bit b over the document's shingles.
    # The vote counts 8 bits at once: (h >> j) & 0x0101..01 puts bit 8*l + j of h in byte l,
    # so a plain uint64 sum over a document's shingles counts 8 bits in 8 byte lanes; sums run
    # over chunks of <= 255 shingles so that no lane overflows, then chunks add up per document
    starts = np.cumsum(counts) - counts
    n_chunks = (counts + 254) // 255
    if (n_chunks == 1).all():
        chunk_starts, chunk_doc_starts = starts, None
    else:
        chunk_doc_starts = np.cumsum(n_chunks) - n_chunks
        chunk_starts = np.repeat(starts, n_chunks) + 255 * (np.arange(n_chunks.sum()) - np.repeat(chunk_doc_starts, n_chunks))
    lanes = np.empty((len(chunk_starts), 8), np.uint64)
    for s in range(n_fingerprints):
        h = _mix64(low40 ^ _SALTS[s])
        for j in range(8):
            lanes[:, j] = np.add.reduceat((h >> np.uint64(j)) & _LANES, chunk_starts)
        # lanes[c, j] byte l = votes for bit 8*l + j  ->  votes[c, 8*l + j]
        votes = lanes.view(np.uint8).reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, 64)
        if chunk_doc_starts is not None:
            votes = np.add.reduceat(votes, chunk_doc_starts, axis=0, dtype=np.int64)
        bits = votes > (counts >> 1)[:, None]  # 2 * votes > count: a strict majority
        out[docs, s] = np.packbits(bits, axis=1, bitorder="little").view(np.uint64).reshape(-1)
    return out


def simhash_batch(texts: Sequence[str], shingle_size: int, salt: int = 0) -> np.ndarray:
    """64-bit SimHash fingerprints (uint64) of a batch of texts; another salt gives an
    independent fingerprint."""
    return simhash_fingerprints(texts, shingle_size, salt + 1)[:, salt]


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.bitwise_count(np.bitwise_xor(a, b))


def _close_pairs_in_runs(key_sorted: np.ndarray, fp_sorted: np.ndarray, order: np.ndarray, k: int, out: np.ndarray) -> int:
    """Compare every pair inside each run of equal keys; write (i << 32) | j, i < j, of the pairs
    within k bits to ``out`` while it has room. Returns the number of such pairs.

    Compiled with numba (``_scan_kernel``): this loop is where an exhaustive k=10 index spends
    its time (~1M comparisons per table on 100k fingerprints, since real SimHash bits are
    biased and the runs are long). numpy needs ~10 array passes per comparison step and ran at
    ~12 ns a comparison; the compiled loop runs at ~1 ns (benchmarks/clean_dedup.py: index
    2.9 s -> 0.7 s CPU for 286 tables). numba is already installed with umap-learn and shap.
    """
    n = key_sorted.shape[0]
    limit = np.uint64(k)
    m1, m2, m4 = np.uint64(0x5555555555555555), np.uint64(0x3333333333333333), np.uint64(0x0F0F0F0F0F0F0F0F)
    ones = np.uint64(0x0101010101010101)
    found = 0
    start = 0
    while start < n:
        end = start + 1
        while end < n and key_sorted[end] == key_sorted[start]:
            end += 1
        for i in range(start, end - 1):
            fi = fp_sorted[i]
            for j in range(i + 1, end):
                x = fi ^ fp_sorted[j]
                x = x - ((x >> np.uint64(1)) & m1)  # SWAR popcount (LLVM turns it into popcnt)
                x = (x & m2) + ((x >> np.uint64(2)) & m2)
                x = (x + (x >> np.uint64(4))) & m4
                if (x * ones) >> np.uint64(56) <= limit:
                    if found < out.shape[0]:
                        a, b = order[i], order[j]
                        out[found] = (min(a, b) << np.uint64(32)) | max(a, b)
                    found += 1
        start = end
    return found


def _close_pairs_in_runs_numpy(key_sorted: np.ndarray, fp_sorted: np.ndarray, order: np.ndarray, k: int) -> np.ndarray:
    """The same scan as array passes, for small inputs, where loading numba (~1 s once per
    process) costs more than it saves: compare each element with the one d places further in
    its run, d = 1, 2, ..., on the shrinking set of elements whose run reaches that far."""
    n = len(key_sorted)
    breaks = np.flatnonzero(key_sorted[1:] != key_sorted[:-1]) + 1
    run_ends = np.append(breaks, n)
    remaining = np.repeat(run_ends, np.diff(run_ends, prepend=0)) - np.arange(n)  # to the run's end
    first, second = [], []
    cand = np.flatnonzero(remaining > 1)
    d = 1
    while cand.size:
        close = cand[np.bitwise_count(fp_sorted[cand] ^ fp_sorted[cand + d]) <= k]
        first.append(close)
        second.append(close + d)
        d += 1
        cand = cand[remaining[cand] > d]
    if not first:
        return np.zeros(0, np.uint64)
    a, b = order[np.concatenate(first)], order[np.concatenate(second)]
    return (np.minimum(a, b) << np.uint64(32)) | np.maximum(a, b)


@functools.cache
def _scan_kernel() -> Callable[..., int]:
    """The numba-compiled run scan; compiled on first use (cached on disk), so importing this
    module or running MinHash does not pay for numba."""
    import numba

    kernel = numba.njit(cache=True, nogil=True)(_close_pairs_in_runs)
    one = np.zeros(1, np.uint64)
    kernel(one, one, one, 0, one.copy())  # compile (or load) now, not in the first of several threads
    return kernel


def _block_bounds(n_blocks: int) -> np.ndarray:
    return np.linspace(0, 64, n_blocks + 1).round().astype(int)


def _table_pairs(uniq: np.ndarray, block_values: list[np.ndarray], widths: np.ndarray,
                 chosen: tuple[int, ...], k: int, compiled: bool) -> np.ndarray:
    """Pairs within k bits among the fingerprints that agree on the ``chosen`` blocks (one table),
    as uint64 codes (i << 32) | j, i < j, of positions in ``uniq``."""
    n = len(uniq)
    key = block_values[chosen[0]]
    for c in chosen[1:]:
        key = (key << np.uint64(widths[c])) | block_values[c]
    if sum(int(widths[c]) for c in chosen) > 32:
        key = (key ^ (key >> np.uint64(32))) & np.uint64(0xFFFFFFFF)  # fold: equal blocks, equal key
    # one np.sort of (key << 32 | position): numpy's vectorised sort of plain integers is
    # 10-20x faster than np.argsort of the key
    packed = np.sort((key << np.uint64(32)) | np.arange(n, dtype=np.uint64))
    order = packed & np.uint64(0xFFFFFFFF)
    key_sorted = packed >> np.uint64(32)
    fp_sorted = uniq[order.astype(np.intp)]
    if not compiled:
        return _close_pairs_in_runs_numpy(key_sorted, fp_sorted, order, k)
    scan = _scan_kernel()
    out = np.empty(1 << 14, np.uint64)
    found = scan(key_sorted, fp_sorted, order, k, out)
    if found > len(out):  # rare: more pairs than room; scan again with room for all
        out = np.empty(found, np.uint64)
        scan(key_sorted, fp_sorted, order, k, out)
    return out[:found].copy()


_COMPILED_SCAN_MIN = 50_000  # distinct fingerprints from which the numba scan pays for loading numba


def simhash_pairs(fingerprints: np.ndarray, k: int, n_blocks: int, threads: int = 1,
                  compiled: bool | None = None) -> np.ndarray:
    """All index pairs (i, j), i < j, whose fingerprints differ in at most ``k`` bits.

    One table per choice of ``n_blocks - k`` blocks: sorting by those bits puts every pair
    within distance k next to each other in at least one table (pigeonhole), so only runs of
    equal keys are compared. Identical fingerprints are collapsed first so that a big cluster
    of exact copies costs nothing. ``threads`` > 1 builds tables in parallel threads (numpy's
    sort and the compiled scan release the GIL). ``compiled``: scan runs with the numba kernel
    (default: from 50,000 distinct fingerprints) or with numpy. Rows come back sorted.
    """
    fps = np.asarray(fingerprints, dtype=np.uint64)
    uniq, inverse = np.unique(fps, return_inverse=True)
    inverse = inverse.reshape(-1)
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
    if len(uniq) > 1 and k > 0:
        if len(uniq) >= 1 << 32:
            raise ValueError("simhash_pairs handles fewer than 2**32 distinct fingerprints")
        bounds = _block_bounds(n_blocks)
        widths = np.diff(bounds)
        block_values = [(uniq >> np.uint64(lo)) & np.uint64((1 << int(w)) - 1) for lo, w in zip(bounds[:-1], widths)]
        tables = list(itertools.combinations(range(n_blocks), n_blocks - k))
        if compiled is None:
            compiled = len(uniq) >= _COMPILED_SCAN_MIN
        if compiled:
            _scan_kernel()
        if threads > 1:
            with ThreadPoolExecutor(threads) as pool:
                found = list(pool.map(lambda chosen: _table_pairs(uniq, block_values, widths, chosen, k, compiled), tables))
        else:
            found = [_table_pairs(uniq, block_values, widths, chosen, k, compiled) for chosen in tables]
        codes = np.unique(np.concatenate(found))
        if codes.size:
            # map unique-fingerprint pairs back to one document each (the group's first)
            first_doc = np.full(len(uniq), -1, np.int64)
            first_doc[inverse[::-1]] = np.arange(len(fps))[::-1]
            a = first_doc[(codes >> np.uint64(32)).astype(np.intp)]
            b = first_doc[(codes & np.uint64(0xFFFFFFFF)).astype(np.intp)]
            pairs.append(np.stack([a, b], axis=1))
    if not pairs:
        return np.zeros((0, 2), np.int64)
    out = np.sort(np.concatenate(pairs).astype(np.int64), axis=1)
    return out[np.lexsort((out[:, 1], out[:, 0]))]


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
