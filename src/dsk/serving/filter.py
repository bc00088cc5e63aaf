"""A content filter from a blocklist file: blocked words/phrases and regular expressions.

One entry per line; blank lines and lines starting with ``#`` are skipped. A line
``re:<pattern>`` is a regular expression; any other line is a word or phrase, matched
case-insensitively on word boundaries. A prompt that matches is refused (HTTP 400 with the
rule); generated text is checked as it streams and cut before the first match.

Streaming uses the `regex` module's partial matching: only a tail of the text that could
still grow into a match is held back, so a filter costs no streaming delay on ordinary text
(Python's `re` cannot tell "could still match", which would force a fixed hold-back window).

    $ printf 'badword\\nre:\\b\\d{3}-\\d{2}-\\d{4}\\b\\n' > blocklist.txt
    $ dsk serve --blocklist blocklist.txt
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import regex

from dsk.errors import DskError


@dataclass(frozen=True)
class FilterMatch:
    rule: str  # the blocklist line that matched
    line: int  # its 1-based line number in the file
    start: int  # where the match starts in the checked text
    end: int


class ContentFilter:
    def __init__(self, rules: list[tuple[str, int, "regex.Pattern[str]"]]):
        self.rules = rules
        self.lines: list[str] | None = None  # the source lines (from_lines): rebuilt in an engine process

    @classmethod
    def from_lines(cls, lines: list[str], *, where: str = "blocklist") -> "ContentFilter":
        rules = []
        for number, raw in enumerate(lines, start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("re:"):
                pattern = raw.rstrip("\r\n").lstrip()[3:]  # a regex keeps its trailing spaces
                try:
                    compiled = regex.compile(pattern, regex.IGNORECASE | regex.V0)
                except regex.error as exc:
                    raise DskError(f"{where} line {number}: bad regular expression {pattern!r}: {exc}") from None
            else:
                # \b only where the phrase starts/ends with a word character, so "c++" works too
                left = r"\b" if regex.match(r"\w", line) else ""
                right = r"\b" if regex.search(r"\w$", line) else ""
                compiled = regex.compile(left + regex.escape(line) + right, regex.IGNORECASE)
            rules.append((line, number, compiled))
        out = cls(rules)
        out.lines = list(lines)
        return out

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

    def check(self, text: str, *, final: bool = True) -> FilterMatch | None:
        """The earliest match in ``text``, or None.

        With ``final=False`` (text still growing) a match that touches the end of the text is
        not reported yet: more text may turn it into a non-match ("badword" → "badwords").
        """
        best: FilterMatch | None = None
        for rule, number, pattern in self.rules:
            for m in pattern.finditer(text, overlapped=False):
                if not final and m.end() == len(text):
                    break
                if best is None or m.start() < best.start:
                    best = FilterMatch(rule, number, m.start(), m.end())
                break
        return best

    def safe_length(self, text: str) -> int:
        """How much of a growing ``text`` can be sent now: up to where a match could still start."""
        safe = len(text)
        for _rule, _number, pattern in self.rules:
            for m in pattern.finditer(text, partial=True):
                if m.partial or m.end() == len(text):
                    safe = min(safe, m.start())
                    break
        return safe
