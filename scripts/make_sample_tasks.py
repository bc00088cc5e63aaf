"""Write data/sample/tasks/: small, checkable instruction tasks for `dsk finetune` (seeded).

Each task has one right answer, so learning is measured by exact match: copy, reverse, first
word, last word and count words over 2-4 words drawn from the commonest words of
data/sample/tinyshakespeare.txt. Answers read ``Result: ...`` so that every answer word keeps
the leading space it has in the prompt: a byte-level BPE tokenizer gives " dead" and "dead"
different tokens, and a small model should not have to learn to re-spell every word. (No
addition: a held-out sum is a fact never seen in training, which a small model cannot
infer.) Files:

* ``train.jsonl`` (2000 rows) and ``heldout.jsonl`` (200 rows, no prompt shared with train):
  mostly ``{"prompt", "response"}``; every tenth row is a ``{"messages": [...]}`` chat with a
  system turn, so both formats are exercised.
* ``preferences.jsonl`` (600 rows) and ``preferences_heldout.jsonl`` (100 rows):
  ``{"prompt", "chosen", "rejected"}`` where ``rejected`` is a near miss (the words not
  reversed, a count off by one, the wrong end of the list ...).

Run it again to get identical files (< 1 MB together).

    $ python scripts/make_sample_tasks.py
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

SEED = 1234
ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "data" / "sample" / "tinyshakespeare.txt"
OUT = ROOT / "data" / "sample" / "tasks"
N_TRAIN, N_HELDOUT, N_PREF, N_PREF_HELDOUT = 2000, 200, 600, 100
SYSTEM = "Answer with the result only."
TASKS = ("copy", "reverse", "first", "last", "count")


def vocabulary(n: int = 200) -> list[str]:
    """The ``n`` commonest lowercase words of 3-6 letters in the sample corpus."""
    words = re.findall(r"[a-z]+", CORPUS.read_text(encoding="utf-8").lower())
    counts = Counter(w for w in words if 3 <= len(w) <= 6)
    return sorted(w for w, _ in counts.most_common(n))


def make_task(rng: random.Random, words: list[str]) -> tuple[str, str, str]:
    """(prompt, right answer, near-miss answer) for one random task."""
    task = rng.choice(TASKS)
    picked = [rng.choice(words) for _ in range(rng.randint(2, 4))]
    while len(set(picked)) < len(picked):  # distinct words, so reverse/first/last are unambiguous
        picked = [rng.choice(words) for _ in range(len(picked))]
    text = " ".join(picked)
    r = "Result: "
    if task == "copy":
        return f"copy: {text}", r + text, r + " ".join(picked[:-1])
    if task == "reverse":
        return f"reverse: {text}", r + " ".join(reversed(picked)), r + text
    if task == "first":
        return f"first word: {text}", r + picked[0], r + picked[-1]
    if task == "last":
        return f"last word: {text}", r + picked[-1], r + picked[0]
    n = len(picked)
    return f"count words: {text}", r + str(n), r + str(n + rng.choice((-1, 1)))


def unique_tasks(rng: random.Random, words: list[str], n: int, taken: set[str]) -> list[tuple[str, str, str]]:
    out = []
    while len(out) < n:
        prompt, right, wrong = make_task(rng, words)
        if prompt not in taken:
            taken.add(prompt)
            out.append((prompt, right, wrong))
    return out


def as_instruction(i: int, prompt: str, answer: str) -> dict:
    if i % 10 == 9:
        return {"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": answer},
        ]}
    return {"prompt": prompt, "response": answer}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def main(out: Path = OUT) -> None:
    rng = random.Random(SEED)
    words = vocabulary()
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    # held-out first, so that its prompts are excluded from every training file
    heldout = unique_tasks(rng, words, N_HELDOUT, taken)
    pref_heldout = unique_tasks(rng, words, N_PREF_HELDOUT, taken)
    train = unique_tasks(rng, words, N_TRAIN, taken)
    prefs = unique_tasks(rng, words, N_PREF, taken)
    write_jsonl(out / "train.jsonl", [as_instruction(i, p, a) for i, (p, a, _) in enumerate(train)])
    write_jsonl(out / "heldout.jsonl", [{"prompt": p, "response": a} for p, a, _ in heldout])
    write_jsonl(out / "preferences.jsonl", [{"prompt": p, "chosen": a, "rejected": w} for p, a, w in prefs])
    write_jsonl(out / "preferences_heldout.jsonl",
                [{"prompt": p, "chosen": a, "rejected": w} for p, a, w in pref_heldout])
    total = sum(f.stat().st_size for f in out.glob("*.jsonl"))
    print(f"wrote {out}: {N_TRAIN} train, {N_HELDOUT} held-out, {N_PREF}+{N_PREF_HELDOUT} preference rows, "
          f"{total / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
