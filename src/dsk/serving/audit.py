"""The audit log: one JSON line per API request, without the raw prompt unless asked.

Each line holds the time, the API key's id (a hash prefix, never the key), the endpoint, the
prompt's SHA-256, token counts, latency and HTTP status. ``--log-prompts`` adds the prompt
and the output text, and ``--redact-pii`` masks e-mail addresses and phone numbers in them.

    $ dsk serve --audit-log audit.jsonl --log-prompts --redact-pii
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}")
# international or national numbers of 7+ digits, with spaces, dots, dashes or parentheses
PHONE = re.compile(r"(?<![\w])(?:\+?\d{1,3}[\s.-]?)?(?:\(\d{2,4}\)[\s.-]?)?\d{2,4}(?:[\s.-]?\d{2,4}){1,3}(?![\w])")


def redact(text: str) -> str:
    text = EMAIL.sub("[EMAIL]", text)

    def phone(m: re.Match[str]) -> str:
        digits = sum(c.isdigit() for c in m.group(0))
        return "[PHONE]" if digits >= 7 else m.group(0)

    return PHONE.sub(phone, text)


def prompt_hash(prompt: Any) -> str:
    text = prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class AuditLog:
    def __init__(self, path: str | Path | None, *, log_prompts: bool = False, redact_pii: bool = False):
        self.path = Path(path) if path else None
        self.log_prompts = log_prompts
        self.redact_pii = redact_pii
        self._lock = threading.Lock()
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def _text(self, value: Any) -> Any:
        if isinstance(value, str):
            return redact(value) if self.redact_pii else value
        if isinstance(value, list):
            return [self._text(v) for v in value]
        if isinstance(value, dict):
            return {k: self._text(v) for k, v in value.items()}
        return value

    def write(self, *, endpoint: str, status: int, key_id: str | None, prompt: Any = None,
              output: Any = None, **fields: Any) -> None:
        if self.path is None:
            return
        record: dict[str, Any] = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "key_id": key_id,
            "endpoint": endpoint,
            "status": status,
            "prompt_sha256": prompt_hash(prompt) if prompt is not None else None,
            **fields,
        }
        if self.log_prompts:
            record["prompt"] = self._text(prompt)
            record["output"] = self._text(output)
        line = json.dumps(record, ensure_ascii=False, default=str)
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line + "\n")
