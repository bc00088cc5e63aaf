"""`dsk finetune`: options come from `dsk.finetune`'s params schema; the work is `dsk.finetune.run`.

    $ dsk finetune --help
    $ dsk finetune --show-template     # print the chat template and which tokens carry the loss
    $ dsk finetune --data data/sample/tasks/train.jsonl --resume
"""

import inspect

import typer

from dsk.cli.common import stage_command


def _extra() -> list[inspect.Parameter]:
    # neither is a param: they must not change the artifact id
    return [
        inspect.Parameter(
            "show_template", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--show-template", help="Print the chat template (and what is trained) and exit."),
        ),
        inspect.Parameter(
            "resume", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
            default=typer.Option(False, "--resume", help="Continue a killed run with the same settings from its last checkpoint."),
        ),
    ]


command = stage_command("finetune", extra=_extra)
