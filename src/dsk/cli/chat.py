"""`dsk chat [MODEL_ID | --url URL]`: an interactive terminal chat that streams the reply.

Talks to a model artifact in this process, or to a running `dsk serve`. The conversation is
kept as long as it fits the model's context (oldest turns are dropped first).
Commands: /reset forgets the conversation, /exit (or Ctrl-D) quits.

    $ dsk chat finetune:latest
    $ dsk chat --url http://127.0.0.1:8000 --api-key secret
"""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer


def resolve_model_path(ref: str | None) -> str:
    """An artifact id/tag/path (or None: the latest model) → its directory."""
    from pathlib import Path

    from dsk.artifacts import Store
    from dsk.errors import DskError
    from dsk.registry import spec

    store = Store.open()
    if ref is None:
        art = store.latest_of(list(spec("serve").upstream))
        if art is None:
            raise DskError("no model artifact yet: run `dsk pretrain` first, or pass MODEL_ID or --url")
        return str(art.path)
    path = Path(ref)
    if path.is_dir() and (path / "model.safetensors").is_file():
        return str(path)
    art = store.resolve(ref)
    if art.kind and art.kind != "model":
        raise DskError(f"{ref!r} is a {art.kind!r} artifact ({art.stage}), not a model")
    return str(art.path)


def chat(
    model: Optional[str] = typer.Argument(None, help="Model artifact (default: the latest model).", metavar="[MODEL_ID]"),
    url: Optional[str] = typer.Option(None, "--url", help="Talk to a running `dsk serve` at this URL instead."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="API key for --url (default: $DSK_API_KEY).",
                                          show_default=False),
    system: Optional[str] = typer.Option(None, "--system", help="A system message to start the conversation."),
    max_tokens: int = typer.Option(256, "--max-tokens", min=1, help="Most tokens per reply."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(0.95, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for reproducible replies."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto (local model only)."),
) -> None:
    """Chat with a model in the terminal, streaming replies (/reset, /exit)."""
    from dsk import console
    from dsk.errors import DskError
    from dsk.serving.chat import ChatSession, LocalBackend, RemoteBackend

    if url and model:
        raise DskError("give either MODEL_ID or --url, not both")
    if url:
        backend = RemoteBackend(url, api_key=api_key or os.environ.get("DSK_API_KEY"))
        where = url
    else:
        path = resolve_model_path(model)
        backend = LocalBackend.from_artifact(path, device=device)
        where = path
    session = ChatSession(backend, system=system, max_tokens=max_tokens, temperature=temperature,
                          top_p=top_p, seed=seed)
    interactive = sys.stdin.isatty()
    console.info(f"chatting with {where} — /reset forgets, /exit quits")
    try:
        while True:
            if interactive:
                sys.stderr.write("> ")
                sys.stderr.flush()
            line = sys.stdin.readline()
            if not line:
                break
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                session.reset()
                console.info("[dim](conversation reset)[/dim]")
                continue
            dropped = session.dropped
            for piece in session.send(text):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            sys.stdout.flush()
            if session.dropped > dropped:
                console.info(f"[dim](dropped the oldest turns to fit the context)[/dim]")
    except KeyboardInterrupt:
        pass
    finally:
        backend.close()
