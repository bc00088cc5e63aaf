"""A serving smoke test for pipelines: start the server on a free port, send one chat request,
check the response's shape, stop the server.

    >>> from dsk.serving.smoke import smoke_test
    >>> smoke_test(".dsk/artifacts/pretrain/<id>")["ok"]
    True
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from dsk.errors import DskError


def smoke_test(model_artifact: str | Path, *, device: str = "cpu", max_tokens: int = 8,
               timeout_s: float = 120.0) -> dict[str, Any]:
    """Returns {"ok", "url", "model", "status", "latency_s", "completion_tokens", "text", "finish_reason"};
    raises DskError when the server does not answer a well-formed chat completion."""
    import httpx

    from dsk.serving.app import ServerConfig, create_app
    from dsk.serving.loader import load_engine
    from dsk.serving.server import ServerThread

    engine, codec = load_engine(model_artifact, device=device, max_batch_size=2, max_queue=4)
    name = Path(model_artifact).name
    app = create_app(engine, codec, ServerConfig(model_name=name, request_timeout_s=timeout_s))
    with ServerThread(app) as server:
        started = time.perf_counter()
        try:
            resp = httpx.post(
                server.url + "/v1/chat/completions",
                json={"model": name, "messages": [{"role": "user", "content": "Hello!"}],
                      "max_tokens": max_tokens, "temperature": 0},
                timeout=timeout_s,
            )
        except httpx.HTTPError as exc:
            raise DskError(f"serve smoke test: no answer from {server.url}: {exc}") from None
        latency = time.perf_counter() - started
        health = httpx.get(server.url + "/health", timeout=10).json()
    problems = _check_chat(resp)
    if problems:
        raise DskError(f"serve smoke test failed: {problems}")
    body = resp.json()
    choice = body["choices"][0]
    return {
        "ok": True,
        "url": server.url,
        "model": body["model"],
        "status": resp.status_code,
        "latency_s": latency,
        "completion_tokens": body["usage"]["completion_tokens"],
        "text": choice["message"]["content"],
        "finish_reason": choice["finish_reason"],
        "health": health.get("status"),
    }


def _check_chat(resp: Any) -> str | None:
    if resp.status_code != 200:
        return f"HTTP {resp.status_code}: {resp.text[:200]}"
    try:
        body = resp.json()
        choice = body["choices"][0]
        ok = (
            body["object"] == "chat.completion"
            and choice["message"]["role"] == "assistant"
            and isinstance(choice["message"]["content"], str)
            and choice["finish_reason"] in ("stop", "length", "content_filter")
            and body["usage"]["completion_tokens"] >= 1
            and body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
        )
    except (KeyError, IndexError, TypeError, ValueError) as exc:
        return f"malformed response ({exc.__class__.__name__}: {exc})"
    return None if ok else f"unexpected response shape: {resp.text[:200]}"
