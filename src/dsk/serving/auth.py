"""API keys: several keys from `--api-key` and `DSK_API_KEYS`, compared in constant time.

A key is never logged or stored in a log line: requests are attributed to a key id, the
first 8 hex digits of the key's SHA-256.

    $ DSK_API_KEYS=key-one,key-two dsk serve
    $ curl -H "Authorization: Bearer key-one" localhost:8000/v1/models
"""

from __future__ import annotations

import hashlib
import hmac
import os


def key_id(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:8]


def collect_keys(api_key: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """Keys from the option (comma-separated allowed) and the DSK_API_KEYS variable."""
    env = os.environ if env is None else env
    keys: list[str] = []
    for text in (api_key or "", env.get("DSK_API_KEYS", "")):
        keys.extend(k.strip() for k in text.split(",") if k.strip())
    return list(dict.fromkeys(keys))


class KeyChecker:
    def __init__(self, keys: list[str]):
        self._keys = [(k.encode("utf-8"), key_id(k)) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> str | None:
        """The key id for a valid ``Authorization: Bearer KEY`` header, else None.

        Every configured key is compared (no early exit) so the time does not tell which
        key or how much of it matched.
        """
        if not self._keys:
            return "anonymous"
        if not authorization or not authorization.lower().startswith("bearer "):
            return None
        given = authorization[7:].strip().encode("utf-8")
        found = None
        for key, kid in self._keys:
            if hmac.compare_digest(given, key) and found is None:
                found = kid
        return found
