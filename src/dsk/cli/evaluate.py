"""`dsk eval`: options come from `dsk.evaluate`'s params schema; the work is `dsk.evaluate.run`.

    $ dsk eval --compare pretrain:latest quantize:latest
"""

import inspect
from typing import Optional

import typer

from dsk.cli.common import stage_command


def _extra() -> list[inspect.Parameter]:
    return [inspect.Parameter(
        "compare", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
        default=typer.Option(None, "--compare", help="Evaluate several artifacts (ids, tags, stage:latest; repeat the option or list them after it) and print their metrics side by side.", show_default=False),
    )]


command = stage_command("eval", extra=_extra)
