"""`dsk generate MODEL_ID "prompt"`: one-shot text generation for scripts (stdout gets the text).

    $ dsk generate pretrain:latest "ROMEO:" --max-tokens 64 --seed 1
    $ dsk generate 3f2a9c1b7d4e "What is a tokenizer?" --chat --temperature 0
"""

from __future__ import annotations

import sys
from typing import Optional

import typer


def generate(
    model: str = typer.Argument(..., help="Model artifact: id, id prefix, tag, stage:latest or path.", metavar="MODEL_ID"),
    prompt: str = typer.Argument(..., help="The prompt text ('-' reads it from stdin)."),
    max_tokens: int = typer.Option(64, "--max-tokens", min=1, help="Most tokens to generate."),
    temperature: float = typer.Option(0.8, "--temperature", min=0.0, help="Sampling temperature; 0 is greedy."),
    top_p: float = typer.Option(1.0, "--top-p", min=0.0, max=1.0, help="Nucleus sampling mass."),
    top_k: int = typer.Option(0, "--top-k", min=0, help="Keep only the k most likely tokens (0: off)."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", min=0.01, help="> 1 discourages repeats."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed: the same seed gives the same text."),
    stop: list[str] = typer.Option([], "--stop", help="Stop at this string (repeatable)."),
    chat: bool = typer.Option(False, "--chat", help="Send the prompt as a user chat message."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
) -> None:
    """Generate text from a model artifact once and print it (no server needed)."""
    from dsk.cli.chat import resolve_model_path
    from dsk.serving.chat import ContextFull, LocalBackend
    from dsk.errors import DskError

    if prompt == "-":
        prompt = sys.stdin.read()
    backend = LocalBackend.from_artifact(resolve_model_path(model), device=device)
    sampling = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                    repetition_penalty=repetition_penalty, seed=seed, stop=tuple(stop))
    try:
        pieces = backend.chat([{"role": "user", "content": prompt}], **sampling) if chat \
            else backend.complete(prompt, **sampling)
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except ContextFull as exc:
        raise DskError(str(exc)) from None
    finally:
        backend.close()
