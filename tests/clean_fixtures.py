"""Planted fixtures for the clean tests: deterministic prose-like documents and tables."""

from __future__ import annotations

import random

SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "wen", "dar", "el", "or", "ith", "an", "be", "cu"]


def vocabulary(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def document(rng: random.Random, vocab: list[str], n_words: int) -> str:
    words = [rng.choice(vocab) for _ in range(n_words)]
    # prose-like: sentences of ~12 words, capitalised, with full stops
    out = []
    for i in range(0, n_words, 12):
        sentence = words[i:i + 12]
        sentence[0] = sentence[0].capitalize()
        out.append(" ".join(sentence) + ".")
    return " ".join(out)


def edit_words(rng: random.Random, text: str, vocab: list[str], n_edits: int) -> str:
    words = text.split()
    for pos in rng.sample(range(len(words)), n_edits):
        words[pos] = rng.choice(vocab)
    return " ".join(words)
