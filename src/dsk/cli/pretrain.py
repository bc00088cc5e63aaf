"""`dsk pretrain`: options come from `dsk.pretrain`'s params schema; the work is `dsk.pretrain.run`.

    $ dsk pretrain --help
    $ dsk pretrain --resume          # continue a killed run of the same settings
"""

import inspect

import typer

from dsk.cli.common import stage_command


def _extra() -> list[inspect.Parameter]:
    # --resume is not a param: it must not change the artifact id (resuming yields the same artifact)
    return [inspect.Parameter(
        "resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--resume", help="Continue a killed run with the same settings from its last checkpoint."),
    )]


command = stage_command("pretrain", extra=_extra)
