"""Terminal output shared by every command: a Rich console, quiet/JSON modes, progress bars.

    $ dsk clean data/sample/tinyshakespeare.txt --quiet
"""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

T = TypeVar("T")

# stderr carries progress and human output so that --json output on stdout stays parseable.
# Off a terminal (logs, CI) Rich would wrap at 80 columns and fold ids in tables.
console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 160)
_state = {"quiet": False, "json": False}


def set_mode(*, quiet: bool = False, json_output: bool = False) -> None:
    _state["quiet"] = quiet
    _state["json"] = json_output


def is_quiet() -> bool:
    return _state["quiet"] or _state["json"]


def info(message: str) -> None:
    if not is_quiet():
        console.print(message)


def warn(message: str) -> None:
    # warnings are shown even in quiet mode: they report lost or suspicious input
    console.print(f"[yellow]warning:[/yellow] {message}")


def print_json(payload: Any) -> None:
    sys.stdout.write(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    sys.stdout.flush()


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=is_quiet(),
        transient=False,
    )


@contextmanager
def progress_task(description: str, total: float | None) -> Iterator[Any]:
    """Yield an ``advance(n=1, **status)`` callable driving one Rich progress bar."""
    with make_progress() as progress:
        task = progress.add_task(description, total=total, status="")

        def advance(n: float = 1, status: str | None = None) -> None:
            if status is None:
                progress.advance(task, n)
            else:
                progress.update(task, advance=n, status=status)

        yield advance


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with progress_task(description, total) as advance:
        for item in items:
            yield item
            advance()
