"""Talking to a model from a terminal or a script: a local engine or a running `dsk serve`.

Both backends stream text pieces as they come. :class:`ChatSession` keeps the conversation,
dropping the oldest turns when it would no longer fit the model's context.

    >>> backend = LocalBackend.from_artifact(".dsk/artifacts/pretrain/<id>")
    >>> session = ChatSession(backend, max_tokens=128)
    >>> for piece in session.send("Hello"): print(piece, end="")
    >>> backend = RemoteBackend("http://127.0.0.1:8000", api_key="secret")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

from dsk.errors import DskError


class ContextFull(Exception):
    """The conversation (plus the reply's max_tokens) no longer fits the model's context."""


class LocalBackend:
    """The engine in this process (one sequence at a time, no HTTP)."""

    def __init__(self, engine: Any, codec: Any):
        self.engine, self.codec = engine, codec

    @classmethod
    def from_artifact(cls, path: str | Path, *, device: str = "cpu") -> "LocalBackend":
        from dsk.serving.loader import load_engine

        engine, codec = load_engine(path, device=device, max_batch_size=1, max_queue=1)
        return cls(engine.start(), codec)

    def close(self) -> None:
        self.engine.stop()

    def _run(self, ids: list[int], sampling: dict[str, Any]) -> Iterator[str]:
        from dsk.serving.sampling import SamplingParams

        params = SamplingParams(**sampling)
        try:
            self.engine.check_lengths(len(ids), params.max_tokens)
        except ValueError as exc:
            raise ContextFull(str(exc)) from None
        for ev in self.engine.stream(ids, params):
            if ev.kind == "delta":
                yield ev.text
            elif ev.kind == "error":
                raise DskError(f"generation failed: {ev.text}")

    def complete(self, prompt: str, **sampling: Any) -> Iterator[str]:
        return self._run(self.codec.completion_ids(prompt), sampling)

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        return self._run(self.codec.chat_ids(messages), sampling)


class RemoteBackend:
    """A running server's /v1/chat/completions and /v1/completions, streamed over SSE."""

    def __init__(self, url: str, *, api_key: str | None = None, model: str | None = None, timeout_s: float = 300.0):
        import httpx

        self.url = url.rstrip("/")
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s)
        self.model = model

    def close(self) -> None:
        self.client.close()

    def _stream(self, path: str, body: dict[str, Any]) -> Iterator[str]:
        import httpx

        body = {**body, "stream": True}
        if self.model:
            body["model"] = self.model
        try:
            with self.client.stream("POST", path, json=body) as resp:
                if resp.status_code != 200:
                    resp.read()
                    message = _error_message(resp)
                    if resp.status_code == 400 and "context" in message:
                        raise ContextFull(message)
                    raise DskError(f"{self.url}{path}: HTTP {resp.status_code}: {message}")
                for line in resp.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        return
                    payload = json.loads(data)
                    if "error" in payload:
                        raise DskError(f"{self.url}{path}: {payload['error'].get('message')}")
                    for choice in payload.get("choices", []):
                        piece = choice.get("delta", {}).get("content") if "delta" in choice else choice.get("text")
                        if piece:
                            yield piece
        except httpx.HTTPError as exc:
            raise DskError(f"cannot reach {self.url}: {exc}; is `dsk serve` running there?") from None

    def complete(self, prompt: str, **sampling: Any) -> Iterator[str]:
        return self._stream("/v1/completions", {"prompt": prompt, **_wire(sampling)})

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        return self._stream("/v1/chat/completions", {"messages": messages, **_wire(sampling)})


def _wire(sampling: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in sampling.items() if v is not None}
    if "stop" in out:
        out["stop"] = list(out["stop"])
    return out


def _error_message(resp: Any) -> str:
    try:
        return resp.json()["error"]["message"]
    except Exception:
        return resp.text[:200]


class ChatSession:
    """A conversation: history of messages, trimmed from the oldest turn when it gets too long."""

    def __init__(self, backend: Any, *, system: str | None = None, **sampling: Any):
        self.backend = backend
        self.system = system
        self.sampling = sampling
        self.history: list[dict[str, str]] = []
        self.dropped = 0

    def reset(self) -> None:
        self.history = []

    def messages(self) -> list[dict[str, str]]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.history

    def send(self, text: str) -> Iterator[str]:
        """Stream the assistant's reply to ``text``; the exchange is kept in the history."""
        self.history.append({"role": "user", "content": text})
        while True:
            try:
                pieces = self.backend.chat(self.messages(), **self.sampling)
                reply = []
                for piece in pieces:
                    reply.append(piece)
                    yield piece
                break
            except ContextFull:
                if len(self.history) <= 1:
                    self.history.pop()
                    raise DskError("this message alone does not fit the model's context; send a shorter one "
                                   "or lower --max-tokens") from None
                # drop the oldest exchange (user + assistant) and try again
                del self.history[: 2 if len(self.history) > 2 else 1]
                self.dropped += 1
        self.history.append({"role": "assistant", "content": "".join(reply)})
