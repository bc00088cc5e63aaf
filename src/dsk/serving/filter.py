"""A content filter from a blocklist file: blocked words/phrases and regular expressions.

One entry per line; blank lines and lines starting with ``#`` are skipped. A line
``re:<pattern>`` is a regular expression; any other line is a word or phrase, matched
case-insensitively on word boundaries. A prompt that matches is refused (HTTP 400 with the
rule); generated text is checked as it streams and cut before the first match.

    $ printf 'badword\\nre:\\b\\d{3}-\\d{2}-\\d{4}\\b\\n' > blocklist.txt
    $ dsk serve --blocklist blocklist.txt
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dsk.errors import DskError

# Streamed output keeps this many characters back (besides the longest literal) so that a regex
# match spanning two chunks is caught before any of it is sent.
REGEX_HOLDBACK = 64


@dataclass(frozen=True)
class FilterMatch:
    rule: str  # the blocklist line that matched
    line: int  # its 1-based line number in the file
    start: int  # where the match starts in the checked text
    end: int


class ContentFilter:
    def __init__(self, rules: list[tuple[str, int, re.Pattern[str]]], literal_max: int, has_regex: bool):
        self.rules = rules
        self.holdback = max(literal_max - 1, 0) + (REGEX_HOLDBACK if has_regex else 0)

    @classmethod
    def from_lines(cls, lines: list[str], *, where: str = "blocklist") -> "ContentFilter":
        rules: list[tuple[str, int, re.Pattern[str]]] = []
        literal_max = 0
        has_regex = False
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                pattern = line[3:]
                try:
                    compiled = re.compile(pattern, re.IGNORECASE)
                except re.error as exc:
                    raise DskError(f"{where} line {number}: bad regular expression {pattern!r}: {exc}") from None
                has_regex = True
            else:
                # \b only where the phrase starts/ends with a word character, so "c++" still works
                left = r"\b" if re.match(r"\w", line) else ""
                right = r"\b" if re.search(r"\w$", line) else ""
                compiled = re.compile(left + re.escape(line) + right, re.IGNORECASE)
                literal_max = max(literal_max, len(line))
            rules.append((line, number, compiled))
        return cls(rules, literal_max, has_regex)

    @classmethod
    def load(cls, path: str | Path) -> "ContentFilter":
        p = Path(path)
        if not p.is_file():
            raise DskError(f"blocklist file {str(p)!r} does not exist; pass --blocklist PATH to a text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DskError(f"blocklist file {str(p)!r} is not UTF-8 text") from None
        return cls.from_lines(text.splitlines(), where=f"blocklist {str(p)!r}")

    def __len__(self) -> int:
        return len(self.rules)

    def check(self, text: str, start: int = 0) -> FilterMatch | None:
        """The earliest match in ``text[start:]`` (positions relative to ``text``), or None."""
        best: FilterMatch | None = None
        for rule, number, pattern in self.rules:
            m = pattern.search(text, start)
            if m and (best is None or m.start() < best.start):
                best = FilterMatch(rule, number, m.start(), m.end())
        return best
