"""Unit tests of the text rules: normalisation, quality filters, PII, SimHash index, MinHash."""

from __future__ import annotations

import random

import numpy as np
import pytest

from clean_fixtures import document, edit_words, vocabulary
from dsk.clean import near_dup
from dsk.clean.params import Params
from dsk.clean.text import DEFAULT_PII, compile_pii, normalise, quality_reason, redact


def test_normalise_nfc_whitespace_controls():
    decomposed = "Cafe\u0301"  # e + combining acute -> é (NFC)
    text = f"  {decomposed}\t\tau\u00a0lait\x07 \r\nline two   \n\n\n\nthird\ufeff "
    assert normalise(text) == "Café au lait\nline two\n\nthird"


def _reason(text: str, **kw) -> str | None:
    return quality_reason(text, text.split(), Params(**kw))


def test_quality_filters_each_rule():
    prose = "The quick brown fox jumps over the lazy dog and runs far away."
    assert _reason(prose) is None
    assert _reason("Hello there", min_words=3) == "too_few_words"
    assert _reason(prose, max_words=5) == "too_many_words"
    assert _reason("a b c d e f g h") == "mean_word_length_low"
    assert _reason("x" * 30 + " " + "y" * 30 + " " + "z" * 30) == "mean_word_length_high"
    assert _reason("# heading # more # tags here now ok") == "symbol_ratio"
    assert _reason("same line here\nsame line here\nsame line here\nother line") == "duplicate_lines"
    assert _reason("1234 5678 9012 3456 7890 word") == "non_alphabetic"
    assert _reason("") == "empty"


def test_pii_redaction_typed_placeholders_and_counts():
    text = ("Mail jane.doe@example.com or call +1 415-555-0132; server 192.168.1.20, "
            "card 4111 1111 1111 1111. Year 1999 stays.")
    out, counts = redact(text, compile_pii(None))
    assert "jane.doe" not in out and "<EMAIL>" in out
    assert "<PHONE>" in out and "<IP>" in out and "<CARD>" in out
    assert "1999" in out  # a plain number is not PII
    assert counts == {"EMAIL": 1, "PHONE": 1, "IP": 1, "CARD": 1}
    custom, c2 = redact("id AB-1234 here", compile_pii({"ticket": r"AB-\d+"}))
    assert custom == "id <TICKET> here" and c2 == {"TICKET": 1}
    assert set(DEFAULT_PII) == {"EMAIL", "IP", "CARD", "PHONE"}


def test_simhash_index_finds_exactly_the_brute_force_pairs():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2**63, size=300, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, 300).astype(np.uint64)
    # planted neighbours at distance 0..4 by flipping random bits
    planted = []
    for i in range(100):
        flips = rng.choice(64, size=i % 5, replace=False)
        fp = base[i]
        for b in flips:
            fp ^= np.uint64(1) << np.uint64(int(b))
        planted.append(fp)
    fps = np.concatenate([base, np.array(planted, np.uint64)])
    for k, blocks in [(3, 6), (3, 4), (4, 7), (0, 2)]:
        got = {tuple(p) for p in near_dup.simhash_pairs(fps, k, blocks).tolist()}
        brute = {(i, j) for i in range(len(fps)) for j in range(i + 1, len(fps))
                 if bin(int(fps[i]) ^ int(fps[j])).count("1") <= k}
        assert got == brute, (k, blocks)
        assert len(brute) >= 20 * (min(k, 4) + 1) - 5


def test_simhash_index_threads_and_wide_keys_match_brute_force():
    # k=10 (the default) with 13 blocks, 2 threads; k=2 with 13 blocks folds 11-block keys to 32 bits
    rng = np.random.default_rng(5)
    base = rng.integers(0, 2**63, size=400, dtype=np.uint64)
    base[:200] &= np.uint64(0xFFFF00000000FFFF)  # skewed blocks: long runs of equal keys
    planted = []
    for i in range(150):
        fp = base[i]
        for b in rng.choice(64, size=1 + i % 12, replace=False):  # 1..12 bits: no exact copies
            fp ^= np.uint64(1) << np.uint64(int(b))
        planted.append(fp)
    fps = np.concatenate([base, np.array(planted, np.uint64)])
    for k, blocks, threads, compiled in [(10, 13, 2, True), (10, 13, 1, False), (10, 13, 2, False), (2, 13, 2, True)]:
        got = near_dup.simhash_pairs(fps, k, blocks, threads=threads, compiled=compiled)  # numba or numpy scan
        brute = [(i, j) for i in range(len(fps)) for j in range(i + 1, len(fps))
                 if bin(int(fps[i]) ^ int(fps[j])).count("1") <= k]
        assert got.tolist() == [list(p) for p in brute], (k, blocks, threads, compiled)  # sorted rows
        assert len(brute) > (1000 if k == 10 else 20)


def test_batch_tokeniser_matches_words_of():
    texts = ["Hello, World! it's", "", "  \t ", "naïve café—résumé… «quoted» Straße İstanbul\u00a0x\u3000y",
             "a" * 30 + " " + "b" * 17 + " abcdefgh abcdefghi abcdefgh", "UPPER lower MiXeD 123 4,5 upper",
             "tab\tnew\nline\r\nx", "ünï ÜNÏ"]
    hashes, counts = near_dup.word_hashes_batch(texts)
    words = [w for t in texts for w in near_dup.words_of(t)]
    assert counts.tolist() == [len(near_dup.words_of(t)) for t in texts]
    by_word = {}
    for w, h in zip(words, hashes.tolist()):
        assert by_word.setdefault(w, h) == h  # the same word hashes the same everywhere
    assert len(set(by_word.values())) == len(by_word)  # and different words differently


def test_simhash_vote_matches_reference_for_long_documents():
    # > 255 distinct words: the 8-bit lane vote runs over chunks; compare with a plain bit count
    rng = random.Random(6)
    docs = [" ".join(f"w{rng.randint(0, 5000)}" for _ in range(n)) for n in (1, 7, 254, 255, 256, 600, 1500)]
    fps = near_dup.simhash_fingerprints(docs, 1, 2)
    for i, doc in enumerate(docs):
        hashes, _ = near_dup.word_hashes_batch([doc])
        top40 = np.unique(near_dup._mix64(hashes) >> np.uint64(24))
        for salt in range(2):
            h = near_dup._mix64(top40 ^ near_dup._SALTS[salt])
            votes = np.unpackbits(h.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little").sum(axis=0)
            want = np.packbits(2 * votes > len(top40), bitorder="little").view(np.uint64)[0]
            assert fps[i, salt] == want, (i, salt)
    assert np.array_equal(fps[:, 1], near_dup.simhash_batch(docs, 1, salt=1))


def test_simhash_near_duplicates_close_unrelated_far():
    rng = random.Random(1)
    vocab = vocabulary()
    doc = document(rng, vocab, 600)  # k=3 of 64 bits is a tight bound: 1 edit in 600 words
    variant = doc.upper().replace(".", "!")          # case/punctuation only: same words
    one_edit = edit_words(rng, doc, vocab, 1)
    other = document(rng, vocab, 600)
    fps = near_dup.simhash_batch([doc, variant, one_edit, other], shingle_size=2)
    assert near_dup.hamming(fps[0], fps[1]) == 0
    assert near_dup.hamming(fps[0], fps[2]) <= 3
    assert near_dup.hamming(fps[0], fps[3]) > 12


def test_simhash_batch_is_batch_independent():
    rng = random.Random(2)
    vocab = vocabulary()
    docs = [document(rng, vocab, rng.randint(1, 80)) for _ in range(50)]
    together = near_dup.simhash_batch(docs, 3)
    alone = np.concatenate([near_dup.simhash_batch([d], 3) for d in docs])
    assert np.array_equal(together, alone)


def test_union_find_roots_are_smallest_member():
    uf = near_dup.UnionFind(6)
    uf.union_pairs([(4, 5), (5, 2), (0, 1)])
    assert uf.roots().tolist() == [0, 0, 2, 3, 2, 2]


def test_minhash_pairs_with_jaccard_check():
    rng = random.Random(3)
    vocab = vocabulary()
    a = document(rng, vocab, 200)
    b = edit_words(rng, a, vocab, 2)
    c = document(rng, vocab, 200)
    sigs = near_dup.minhash_signatures([a, b, c], shingle_size=1, num_perm=128)
    pairs = near_dup.minhash_pairs(sigs, threshold=0.8, num_perm=128)
    assert pairs.tolist() == [[0, 1]]


@pytest.mark.parametrize("bad", [{"simhash_k": 6, "simhash_blocks": 6}, {"min_words": 10, "max_words": 5}])
def test_params_cross_checks(bad):
    with pytest.raises(ValueError):
        Params(**bad)


def test_verify_pairs_keeps_only_pairs_close_in_both_fingerprints():
    rng = random.Random(4)
    vocab = vocabulary()
    a = document(rng, vocab, 300)
    docs = [a, edit_words(rng, a, vocab, 3), document(rng, vocab, 300)]
    fps = np.stack([near_dup.simhash_batch(docs, 1, salt=s) for s in (0, 1)], axis=1)
    assert near_dup.hamming(fps[0, 0], fps[0, 1]) > 10  # the salts give independent fingerprints
    pairs = np.array([[0, 1], [0, 2]])
    assert near_dup.verify_pairs(pairs, fps, 20).tolist() == [[0, 1]]
    assert near_dup.verify_pairs(pairs, fps, 128).tolist() == [[0, 1], [0, 2]]
