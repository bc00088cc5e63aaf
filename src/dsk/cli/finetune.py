"""`dsk finetune`: options come from `dsk.finetune`'s params schema; the work is `dsk.finetune.run`.

    $ dsk finetune --help
"""

from dsk.cli.common import stage_command

command = stage_command("finetune")
