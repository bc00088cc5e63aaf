"""Text augmentation (EDA, Wei & Zou 2019) that keeps casing, punctuation and stop words.

Every op takes a string and a ``random.Random`` and returns the new string. Words are the
alphabetic tokens of the text; punctuation and whitespace stay where they were, stop words
are never replaced or used as insertion sources, and a replacement takes the casing of the
word it replaces. Synonyms come from a WordNet-derived table shipped with dsk
(``dsk/resources/synonyms_en.tsv.gz``, rebuilt by ``scripts/build_synonyms.py``).

    >>> from dsk.data.augment_ops import compose
    >>> aug = compose([{"type": "EDA", "params": {"synonym_replacement": 0.2}}], modality="text")
    >>> aug("The quick brown fox jumps over the lazy dog.", seed=1).output
"""

from __future__ import annotations

import gzip
import json
import random
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

from dsk.errors import DskError

DEFAULT_SYNONYMS = Path(__file__).resolve().parents[1] / "resources" / "synonyms_en.tsv.gz"

# words (letters, inner apostrophes/hyphens), or runs of anything else (spaces, punctuation)
TOKEN = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*|[^A-Za-z\u00C0-\uFFFF]+|.", re.UNICODE)
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

STOP_WORDS = frozenset(
    """a about above after again against all am an and any are aren't as at be because been
    before being below between both but by can can't cannot could couldn't did didn't do does
    doesn't doing don't down during each few for from further had hadn't has hasn't have haven't
    having he he'd he'll he's her here here's hers herself him himself his how how's i i'd i'll
    i'm i've if in into is isn't it it's its itself let's me more most mustn't my myself no nor
    not of off on once only or other ought our ours ourselves out over own same shan't she she'd
    she'll she's should shouldn't so some such than that that's the their theirs them themselves
    then there there's these they they'd they'll they're they've this those through to too under
    until up very was wasn't we we'd we'll we're we've were weren't what what's when when's where
    where's which while who who's whom why why's with won't would wouldn't you you'd you'll you're
    you've your yours yourself yourselves also just may might must shall will yet s t""".split()
)


@lru_cache(maxsize=4)
def load_synonyms(path: str | None = None) -> dict[str, tuple[str, ...]]:
    """word -> synonyms from a ``word<TAB>syn syn ...`` table (.tsv or .tsv.gz)."""
    p = Path(path) if path else DEFAULT_SYNONYMS
    if not p.is_file():
        raise DskError(
            f"synonym table {str(p)!r} not found; pass an existing word<TAB>synonyms file "
            "or rebuild the shipped one with scripts/build_synonyms.py"
        )
    opener = gzip.open if p.suffix == ".gz" else open
    table: dict[str, tuple[str, ...]] = {}
    try:
        with opener(p, "rt", encoding="utf-8") as f:  # type: ignore[operator]
            for line in f:
                word, _, syns = line.rstrip("\n").partition("\t")
                if syns and word not in STOP_WORDS:
                    table[word.lower()] = tuple(syns.split())
    except (OSError, UnicodeDecodeError) as exc:
        raise DskError(f"cannot read synonym table {str(p)!r}: {exc}; expected word<TAB>synonyms lines") from None
    if not table:
        raise DskError(f"synonym table {str(p)!r} is empty; expected word<TAB>synonyms lines")
    return table


def _is_word(tok: str) -> bool:
    return tok[:1].isalpha()


def match_case(template: str, word: str) -> str:
    if template.isupper() and len(template) > 1:
        return word.upper()
    if template[:1].isupper():
        return word[:1].upper() + word[1:]
    return word


def _n_changes(rate: float, n_words: int) -> int:
    # EDA: change max(1, rate * n) words when the rate is non-zero
    return max(1, int(rate * n_words)) if rate > 0 and n_words else 0


def replace_synonyms(text: str, rng: random.Random, *, rate: float, synonyms: dict) -> str:
    toks = TOKEN.findall(text)
    words = [i for i, t in enumerate(toks) if _is_word(t)]
    cands = [i for i in words if toks[i].lower() in synonyms]
    n = min(_n_changes(rate, len(words)), len(cands))
    for i in rng.sample(cands, n):
        toks[i] = match_case(toks[i], rng.choice(synonyms[toks[i].lower()]))
    return "".join(toks)


def insert_synonyms(text: str, rng: random.Random, *, rate: float, synonyms: dict) -> str:
    toks = TOKEN.findall(text)
    words = [i for i, t in enumerate(toks) if _is_word(t)]
    cands = [toks[i].lower() for i in words if toks[i].lower() in synonyms]
    n = _n_changes(rate, len(words)) if cands else 0
    inserts: dict[int, list[str]] = {}
    for _ in range(n):
        # insert after a word (never before the first) so the opening word keeps its capital
        after = rng.choice(words)
        inserts.setdefault(after, []).append(rng.choice(synonyms[rng.choice(cands)]))
    if not inserts:
        return text
    out = []
    for i, t in enumerate(toks):
        out.append(t)
        for w in inserts.get(i, ()):
            out.append(" " + w)
    return "".join(out)


def swap_words(text: str, rng: random.Random, *, rate: float) -> str:
    toks = TOKEN.findall(text)
    words = [i for i, t in enumerate(toks) if _is_word(t)]
    if len(words) < 2:
        return text
    for _ in range(_n_changes(rate, len(words))):
        a, b = rng.sample(words, 2)
        toks[a], toks[b] = toks[b], toks[a]
    return "".join(toks)


def delete_words(text: str, rng: random.Random, *, rate: float) -> str:
    if rate <= 0:
        return text
    toks = TOKEN.findall(text)
    words = [i for i, t in enumerate(toks) if _is_word(t)]
    if len(words) < 2:
        return text
    drop = {i for i in words if rng.random() < rate}
    if len(drop) == len(words):  # never empty a text: keep one word
        drop.discard(rng.choice(words))
    out: list[str] = []
    for i, t in enumerate(toks):
        if i in drop:
            # a deleted word takes one neighbouring space with it, so no double spaces appear
            nxt = toks[i + 1] if i + 1 < len(toks) else ""
            if out and out[-1].isspace():
                out.pop()
            elif (not out or out[-1][-1:].isspace()) and nxt[:1].isspace():
                toks[i + 1] = nxt.lstrip()
            continue
        if t:
            out.append(t)
    return "".join(out)


def shuffle_sentences(text: str, rng: random.Random) -> str:
    sentences = SENTENCE_END.split(text.strip())
    if len(sentences) < 2:
        return text
    rng.shuffle(sentences)
    return " ".join(sentences)


def eda(text: str, rng: random.Random, *, synonym_replacement: float, random_insertion: float,
        random_swap: float, random_deletion: float, synonyms: dict) -> str:
    """All four EDA ops in the paper's order, each at its own rate (0 turns one off)."""
    text = replace_synonyms(text, rng, rate=synonym_replacement, synonyms=synonyms)
    text = insert_synonyms(text, rng, rate=random_insertion, synonyms=synonyms)
    text = swap_words(text, rng, rate=random_swap)
    return delete_words(text, rng, rate=random_deletion)


# ------------------------------------------------------------------ chat / instruction examples

USER_ROLES = {"user", "human"}
INSTRUCTION_INPUT_KEYS = ("instruction", "input", "prompt", "question")


def parse_structured(text: str) -> Any | None:
    """A chat (``{"messages": [...]}`` or a list of messages) or instruction record, else None."""
    s = text.lstrip()
    if not s.startswith(("{", "[")):
        return None
    try:
        obj = json.loads(text)
    except ValueError:
        return None
    if isinstance(obj, list) and obj and all(isinstance(m, dict) and "role" in m for m in obj):
        return obj
    if isinstance(obj, dict) and (isinstance(obj.get("messages"), list)
                                  or any(k in obj for k in INSTRUCTION_INPUT_KEYS)):
        return obj
    return None


def map_user_turns(obj: Any, fn: Callable[[str], str]) -> Any:
    """Apply ``fn`` to the user turns / instruction inputs only; answers stay byte-identical."""
    messages = obj if isinstance(obj, list) else obj.get("messages")
    if isinstance(messages, list):
        for m in messages:
            if isinstance(m, dict) and m.get("role") in USER_ROLES and isinstance(m.get("content"), str):
                m["content"] = fn(m["content"])
        return obj
    for k in INSTRUCTION_INPUT_KEYS:
        if isinstance(obj.get(k), str) and obj[k]:
            obj[k] = fn(obj[k])
    return obj
